"""Where gymtape's bundled data lives: task files of the built-in environments and chat templates.

In a checkout it is the top-level ``datasets/`` folder. (Installed from a wheel, see
``pyproject.toml``.) Every lookup of bundled data goes through :func:`datasets_dir`.
"""

from __future__ import annotations

from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[1] / "datasets"


def datasets_dir() -> Path:
    """The folder holding ``envs/`` and ``chat_templates/``."""
    return _CHECKOUT


def chat_template_path(name: str) -> Path:
    """A bundled Jinja chat template, e.g. ``chatml_tools.jinja``."""
    return datasets_dir() / "chat_templates" / name


def env_tasks_path(env: str, split: str) -> Path:
    """A built-in environment's task file: ``envs/<env>/<split>.jsonl``."""
    return datasets_dir() / "envs" / env / f"{split}.jsonl"
