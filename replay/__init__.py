"""gymtape replay: offline train-generation consistency checks over a tape.

:func:`check_tape` runs the structural checks (re-tokenization, re-templating, history, field
consistency) that need only the tokenizer; tapes are read through :class:`recorder.Tape`.
:func:`replay_tape` re-scores every generated token with a trainer-side model (or a live vLLM)
and measures the mismatch with the recorded sampling logprobs (``grouped_metrics``: trainer_bridge's
one definition of the mismatch metrics, under replay's names).
:func:`diff_tapes` pairs the rollouts of two tapes and finds where each pair first differs;
:func:`run_ab` trains the splice and the re-templating arm from one seed and writes the A/B
report (``gymtape train --ab``). ``print_*`` / ``write_*_html`` render the reports of inspect, check, replay and diff (terminal,
self-contained HTML).
"""

from ._check import CheckReport, check_tape
from ._diff import DiffError, DiffReport, diff_tapes
from ._render import print_check, print_diff, print_replay, print_summary, write_diff_html, write_replay_html
from ._engine_url import EngineReplayError
from ._replay import ReplayError, ReplayReport, TokenOutOfVocabError, UnknownMetricError, parse_fail_above, replay_tape

_AB_NAMES = ("ABReport", "run_ab")  # trains: pulls in torch
_TORCH_NAMES = ("ReplayModelError", "ScoreSettings", "load_model", "score_sequences")
#: replay's names for the mismatch metrics, which are defined once, in trainer_bridge (that loads torch).
_METRICS = {"grouped_metrics": "grouped_mismatch_metrics", "token_metrics": "token_mismatch_metrics"}


def __getattr__(name: str):  # the model scorer and trainer_bridge pull in torch: load them on first use
    if name in _TORCH_NAMES:
        from . import _score

        return getattr(_score, name)
    if name in _AB_NAMES:
        from . import _ab

        return getattr(_ab, name)
    if name in _METRICS:
        from trainer_bridge import grouped_mismatch_metrics, token_mismatch_metrics

        return grouped_mismatch_metrics if name == "grouped_metrics" else token_mismatch_metrics
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_TORCH_NAMES) | set(_METRICS) | set(_AB_NAMES))


__all__ = ["ABReport", "CheckReport", "check_tape", "print_check", "print_summary", "run_ab"]
__all__ += ["DiffError", "DiffReport", "diff_tapes", "print_diff", "print_replay", "write_diff_html",
            "write_replay_html"]
__all__ += ["EngineReplayError", "ReplayError", "ReplayModelError", "ReplayReport", "ScoreSettings",
            "TokenOutOfVocabError", "UnknownMetricError", "grouped_metrics", "load_model", "parse_fail_above", "replay_tape", "score_sequences", "token_metrics"]
