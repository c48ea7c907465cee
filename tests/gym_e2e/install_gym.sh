#!/usr/bin/env bash
# Install the real NeMo Gym (nemo-gym 0.4.0) into a separate venv, for the end-to-end test.
#
#   tests/gym_e2e/install_gym.sh [VENV]        (default: .venv-gym next to the repo root)
#
# nemo-gym 0.4.0 declares Requires-Python >=3.12 (0.5+ needs >=3.13.14) but runs on 3.11:
#   1. `pip install --no-deps --ignore-requires-python nemo-gym==0.4.0`
#   2. its own Requires-Dist (the non-extra lines of the wheel's METADATA) installed normally.
# Idempotent: an existing venv that already imports nemo_gym 0.4.0 and has the `gym` CLI is
# left alone (exit 0). Exits non-zero on any failure.
#
# Environment knobs: PYTHON (interpreter for the venv, default python3; must be 3.11+),
# GYM_VERSION (default 0.4.0), GYM_PIP_CONSTRAINTS (optional pip constraints file, e.g. a
# `pip freeze` of a known-good venv, to pin the dependency versions).
#
# Observed (2 cores, PyPI via pip, Python 3.11.7): ~65 s, 1.4 GB venv; every Requires-Dist entry
# installs from a binary wheel (no compilation, no workaround needed). Resolved then: ray 2.60.0,
# mlflow 3.17.2, pyarrow 25.0.1, pandas 3.1.1, openai 2.7.2, fastapi 0.165.0, aiohttp 3.14.5.
# pip prints many "WARNING: Location 'file:///opt/pypi...' is ignored" lines: harmless (this
# machine's extra local indexes lack those packages). `uv` is not needed: gym_env.sh passes
# +skip_venv_if_present=true and points each server's .venv at this venv.
set -euo pipefail

VENV=${1:-$(cd "$(dirname "$0")/../.." && pwd)/.venv-gym}
PYTHON=${PYTHON:-python3}
GYM_VERSION=${GYM_VERSION:-0.4.0}

ok() {
  [ -x "$VENV/bin/gym" ] && "$VENV/bin/python" - "$GYM_VERSION" <<'PY' >/dev/null 2>&1
import sys, importlib.metadata as md
assert md.version("nemo-gym") == sys.argv[1]
import nemo_gym, ray, responses_api_agents.simple_agent.app, responses_api_models.vllm_model.app  # noqa
PY
}

if ok; then
  echo "nemo-gym $GYM_VERSION already installed in $VENV"
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip

# 1. Gym itself, ignoring its Python floor and its dependencies.
"$PY" -m pip install -q --no-deps --ignore-requires-python "nemo-gym==$GYM_VERSION"

# 2. Its Requires-Dist (no extras), read from the installed metadata.
REQS=$(mktemp)
trap 'rm -f "$REQS"' EXIT
"$PY" - >"$REQS" <<'PY'
import importlib.metadata as md
for r in md.requires("nemo-gym") or []:
    if "extra ==" not in r:
        print(r.split(";")[0].strip())
PY
echo "installing $(wc -l <"$REQS") requirements of nemo-gym $GYM_VERSION"
CONSTRAINTS=()
[ -n "${GYM_PIP_CONSTRAINTS:-}" ] && CONSTRAINTS=(-c "$GYM_PIP_CONSTRAINTS")
"$PY" -m pip install -q -r "$REQS" "${CONSTRAINTS[@]}"

ok || { echo "install_gym.sh: nemo-gym import check failed in $VENV" >&2; exit 1; }
echo "nemo-gym $GYM_VERSION installed in $VENV"
