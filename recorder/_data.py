"""Where gymtape's bundled data lives: task files of the built-in environments and chat templates.

One folder, two places: in a checkout it is the top-level ``datasets/`` folder; installed
(a wheel, ``pip install .``) it is ``recorder/_datasets/`` inside the installed package, where
``pyproject.toml`` maps ``datasets/`` (``package-dir``/``package-data``). The installed copy is
looked up first: beside an installed ``recorder`` in site-packages, a folder named
``datasets`` would be Hugging Face's library, not ours. Every lookup of bundled data goes
through :func:`datasets_dir`.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from ._errors import BundledDataError

#: The package folder the wheel ships ``datasets/`` as (see pyproject.toml).
INSTALLED_NAME = "_datasets"


def datasets_dir() -> Path:
    """The folder holding ``envs/`` and ``chat_templates/``."""
    installed = files(__package__).joinpath(INSTALLED_NAME)
    checkout = Path(__file__).resolve().parents[1] / "datasets"
    for candidate in (installed, checkout):
        if isinstance(candidate, Path) and (candidate / "envs").is_dir():
            return candidate
    raise BundledDataError(f"gymtape's bundled data (envs/, chat_templates/) is missing: looked in {installed} "
                           f"(an installed gymtape) and {checkout} (a checkout); reinstall gymtape")


def chat_template_path(name: str) -> Path:
    """A bundled Jinja chat template, e.g. ``chatml_tools.jinja``."""
    return datasets_dir() / "chat_templates" / name


def env_tasks_path(env: str, split: str) -> Path:
    """A built-in environment's task file: ``envs/<env>/<split>.jsonl``."""
    return datasets_dir() / "envs" / env / f"{split}.jsonl"
