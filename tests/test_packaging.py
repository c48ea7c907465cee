"""gymtape installed as users install it: the wheel, in a fresh venv, run from outside the checkout.

The wheel is built from a copy of the packaged files (not in the checkout: no build/ left
behind) and installed with ``--no-deps``; its dependencies come from this venv's site-packages
through a ``.pth`` line (a plain path, so this venv's editable gymtape is *not* loaded there).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.servers import free_port, start

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
PACKAGES = ("recorder", "replay", "trainer_bridge")
#: What the wheel is built from (pyproject's readme included).
SOURCES = ("pyproject.toml", "README.md", "cli.py", *PACKAGES, "datasets")


def test_pyproject_lists_every_package_folder() -> None:
    on_disk = {".".join(p.parent.relative_to(ROOT).parts)
               for pkg in PACKAGES for p in (ROOT / pkg).rglob("__init__.py")}
    listed = set(PYPROJECT["packages"])
    assert on_disk <= listed, f"packages missing from pyproject.toml (a wheel would leave them out): {on_disk - listed}"
    assert listed - on_disk == {"recorder._datasets"}, "pyproject.toml lists a package that does not exist"
    assert PYPROJECT["package-dir"] == {"recorder._datasets": "datasets"}
    assert not (ROOT / "datasets" / "__init__.py").exists(), "datasets/ is data, never a package named `datasets`"


def test_package_data_ships_every_file_of_datasets() -> None:
    data = ROOT / "datasets"
    files = {p for p in data.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    shipped = {p for pattern in PYPROJECT["package-data"]["recorder._datasets"] for p in data.glob(pattern)}
    assert files - shipped == set(), "files in datasets/ that no package-data pattern in pyproject.toml ships"


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(args)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """(venv, environment) with gymtape installed from its wheel."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
          "-q", "-w", str(tmp / "dist"), str(src)], cwd=tmp, env=env)
    (wheel,) = (tmp / "dist").glob("gymtape-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp, env=env)
    _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps", "--no-index",
          "--disable-pip-version-check", "-q", str(wheel)], cwd=tmp, env=env)
    site = Path(_run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp, env=env).stdout.strip())
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "zz_gymtape_test_deps.pth").write_text("".join(f"{p}\n" for p in deps))
    return venv, env


@pytest.mark.slow
def test_the_wheel_serves_records_a_builtin_env_inspects_and_replays_outside_the_checkout(
        installed: tuple[Path, dict[str, str]], model_dir: Path, tmp_path: Path) -> None:
    venv, env = installed
    work = tmp_path / "work"  # not the checkout: nothing may be found relative to it
    work.mkdir()
    assert ROOT not in work.parents
    where = _run([str(venv / "bin" / "python"), "-c",
                  "import json, cli, recorder; from recorder._data import datasets_dir; "
                  "print(json.dumps([cli.__file__, recorder.__file__, str(datasets_dir())]))"], cwd=work, env=env)
    for path in json.loads(where.stdout):
        assert Path(path).is_relative_to(venv), f"{path}: gymtape must come from the wheel, not the checkout"
    assert json.loads(where.stdout)[2].endswith("recorder/_datasets")
    # ServeProcess's entry point (what `gymtape train` starts) resolves from the wheel alone
    entry = _run([str(venv / "bin" / "python"), "-P", "-m", "recorder.serve", "--help"], cwd=work, env=env)
    assert "--config" in entry.stdout

    gymtape = str(venv / "bin" / "gymtape")
    port = free_port()
    # the embedded model from the shared checkpoint cache (model_dir built it), engine hf
    server = start([gymtape, "serve", "--port", str(port), "--tape", "tape", "--max-batch-size", "4"],
                   tmp_path / "serve.log", port, env={"PYTHONPATH": None}, cwd=work, timeout=300)
    try:
        rec = _run([gymtape, "record", "--env", "addition", "--tape", "tape", "--model-url", f"{server.url}/v1",
                    "--limit", "3", "--max-tokens", "12", "--concurrency", "3", "--seed", "1"], cwd=work, env=env)
        assert "recorded 3 rollouts" in rec.stderr and "failed 0" in rec.stderr, rec.stderr
        assert "joined with server calls 3" in rec.stderr, rec.stderr
    finally:
        assert server.stop() in (0, -15), server.log_tail()  # writes its last calls, closes the tape

    summary = json.loads(_run([gymtape, "inspect", "tape", "--json"], cwd=work, env=env).stdout)
    assert summary["rollouts"] == 3 and summary["calls"] >= 3 and summary["generation_tokens"] > 0
    assert set(summary["status"]) <= {"ok", "truncated"}
    report = json.loads(_run([gymtape, "replay", "tape", "--json"], cwd=work, env=env).stdout)
    assert report["overall"]["tokens"] == summary["generation_tokens"]
    assert report["overall"]["max_abs_dlogprob"] <= 1e-3, "same model, same dtype: the served logprobs re-score"
