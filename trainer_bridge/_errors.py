"""trainer_bridge's own error types; the whole tree is drawn in ``recorder/_errors.py``.

The other trainer_bridge errors live beside the code that raises them (``ExportError``,
``ResumeStateError``, ``FollowerTimeout``, ``TrainError``); these two are raised all over the
package, so they live here.
"""

from __future__ import annotations

from recorder import GymtapeError


class BridgeValueError(GymtapeError, ValueError):
    """An argument of a trainer_bridge function breaks a documented rule (a budget, a bound, a
    correction or aggregation name); the message names the value and the rule."""


class UnsupportedModelError(GymtapeError, TypeError):
    """A model lacks what trainer-side scoring needs (e.g. an output head)."""
