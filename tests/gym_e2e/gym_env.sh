#!/usr/bin/env bash
# Start/stop a real NeMo Gym environment (nemo-gym 0.4.0, installed by install_gym.sh) against an
# OpenAI-compatible model server such as `gymtape serve`.
#
#   gym_env.sh start GYM_VENV MODEL_URL MODEL_NAME LOGDIR   -> prints the agent base URL on stdout
#   gym_env.sh stop LOGDIR                                  -> stops everything `start` started
#
# MODEL_URL is the OpenAI base URL including /v1 (e.g. http://127.0.0.1:8000/v1).
#
# `start` runs `gym env start` with vllm_model_for_training.yaml (token IDs on) in its own session
# and process group (setsid), writes its PID to LOGDIR/gym.pid, and returns once the agent server
# answers HTTP (condition polling with a deadline, no fixed sleeps). Everything it creates lives
# under LOGDIR:
#   LOGDIR/gym.log        gym env start's output (all servers' output too)
#   LOGDIR/servers/*.log  one log per Gym server (nemo_gym_log_dir)
#   LOGDIR/work/          Gym's working dir: cwd of `gym env start`; holds the per-server `.venv`
#                         symlinks to GYM_VENV (so no uv sub-venvs are built), cache/, results/
#   LOGDIR/ray.tmpdir     path of the private temp dir (RAY_TMPDIR and TMPDIR =
#                         /tmp/gymray.XXXXXX; kept short because Ray puts unix sockets in it,
#                         max ~107 chars); `stop` removes it. /tmp/ray is never touched.
#   LOGDIR/head_url, LOGDIR/agent_url
#
# The Gym head server listens on 127.0.0.1:$GYM_HEAD_PORT (default 11000, Gym's default; other
# Gym servers get random ports in 10001-20000). `gym eval run --no-serve` finds the servers through
# the head server, so with a non-default port pass it both keys (the port alone fails validation):
#   gym eval run --no-serve ... +head_server.host=127.0.0.1 +head_server.port=$GYM_HEAD_PORT
#
# Knobs (environment): GYM_HEAD_PORT (11000), GYM_START_TIMEOUT (300 s), GYM_STOP_TIMEOUT (30 s),
# GYM_RESOURCES_SERVER (example_single_tool_call), GYM_AGENT (<resources server>_simple_agent),
# GYM_MODEL_API_KEY (dummy).
set -euo pipefail

die() { echo "gym_env.sh: $*" >&2; exit 1; }

# Live PIDs of session $1 (setsid makes the gym PID the session id; processes that move to another
# process group, e.g. Ray's `ray::IDLE` workers, stay in the session). Zombies are skipped: once
# orphaned they are init's to reap, and init here may be slow to do it.
session_pids() { ps -eo pid=,sid=,stat= | awk -v s="$1" '$2 == s && $3 !~ /^Z/ { print $1 }'; }

# Live PIDs whose command line mentions the private Ray temp dir (Ray daemons), in case one left
# the session.
ray_pids() {
  [ -n "${1:-}" ] || return 0
  local p
  for p in $(pgrep -f -- "$1"); do
    ps -o stat= -p "$p" 2>/dev/null | grep -qv '^Z' && echo "$p"
  done
  return 0
}

wait_gone() {  # wait_gone SECONDS SID RAYDIR: poll until no process of ours is left
  local deadline=$((SECONDS + $1))
  while [ $SECONDS -lt $deadline ]; do
    [ -z "$(session_pids "$2")$(ray_pids "$3")" ] && return 0
    sleep 0.2
  done
  return 1
}

cmd_start() {
  [ $# -eq 4 ] || die "usage: gym_env.sh start GYM_VENV MODEL_URL MODEL_NAME LOGDIR"
  local venv model_url=$2 model_name=$3 logdir
  venv=$(cd "$1" && pwd) || die "no venv at $1"
  [ -x "$venv/bin/gym" ] || die "$venv has no gym CLI (run install_gym.sh $venv)"
  mkdir -p "$4" && logdir=$(cd "$4" && pwd)
  local head_port=${GYM_HEAD_PORT:-11000}
  local rs=${GYM_RESOURCES_SERVER:-example_single_tool_call}
  local agent=${GYM_AGENT:-${rs}_simple_agent}
  local timeout=${GYM_START_TIMEOUT:-300}
  local head_url="http://127.0.0.1:$head_port"

  if [ -f "$logdir/gym.pid" ] && kill -0 "$(cat "$logdir/gym.pid")" 2>/dev/null; then
    die "gym already running from $logdir (pid $(cat "$logdir/gym.pid"))"
  fi
  if curl -s -o /dev/null --max-time 2 "$head_url/"; then
    die "something already listens on $head_url (another Gym?); set GYM_HEAD_PORT"
  fi

  # Point each server's .venv at GYM_VENV: with +skip_venv_if_present=true Gym then only
  # `source`s it instead of building a uv venv per server. In a wheel install Gym puts the venvs
  # under its cwd: <cwd>/<server type>/<server name>/.venv.
  local work="$logdir/work"
  local d
  for d in "resources_servers/$rs" responses_api_agents/simple_agent responses_api_models/vllm_model; do
    mkdir -p "$work/$d"
    ln -sfn "$venv" "$work/$d/.venv"
  done

  local raydir
  raydir=$(mktemp -d /tmp/gymray.XXXXXX)
  echo "$raydir" > "$logdir/ray.tmpdir"
  echo "$head_url" > "$logdir/head_url"
  rm -f "$logdir/agent_url"

  (
    cd "$work"
    # TMPDIR too: Ray's dashboard forkserver leaves /tmp/pymp-* dirs behind when killed.
    export RAY_AUTH_MODE=disabled UV_PYTHON_DOWNLOADS=never RAY_TMPDIR="$raydir" TMPDIR="$raydir" \
      RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1 PATH="$venv/bin:$PATH"
    exec setsid "$venv/bin/gym" env start \
      --resources-server "$rs" \
      --config responses_api_models/vllm_model/configs/vllm_model_for_training.yaml \
      --model-url "$model_url" --model "$model_name" --model-api-key "${GYM_MODEL_API_KEY:-dummy}" \
      +skip_venv_if_present=true \
      "+head_server.host=127.0.0.1" "+head_server.port=$head_port" \
      "+nemo_gym_log_dir=$logdir/servers"
  ) </dev/null >"$logdir/gym.log" 2>&1 &
  local pid=$!
  echo "$pid" > "$logdir/gym.pid"

  # Readiness: the head server lists the agent with its URL, and the agent answers GET /.
  local deadline=$((SECONDS + timeout)) url=""
  while [ $SECONDS -lt $deadline ]; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 60 "$logdir/gym.log" >&2
      cmd_stop "$logdir" >&2 || true
      die "gym env start exited early (log: $logdir/gym.log)"
    fi
    if [ -z "$url" ]; then
      url=$(curl -s --max-time 2 "$head_url/server_instances" 2>/dev/null | "$venv/bin/python" -c '
import json, sys
try:
    rows = json.load(sys.stdin)
except ValueError:
    sys.exit()
for r in rows:
    if r.get("config_path") == sys.argv[1] and r.get("url"):
        print(r["url"])
' "$agent" || true)
    fi
    if [ -n "$url" ] && curl -sf -o /dev/null --max-time 2 "$url/"; then
      echo "$url" > "$logdir/agent_url"
      echo "$url"
      return 0
    fi
    sleep 0.5
  done
  tail -n 60 "$logdir/gym.log" >&2
  cmd_stop "$logdir" >&2 || true
  die "agent $agent not ready after ${timeout}s (log: $logdir/gym.log)"
}

cmd_stop() {
  [ $# -eq 1 ] || die "usage: gym_env.sh stop LOGDIR"
  local logdir=$1 pid="" raydir=""
  [ -f "$logdir/gym.pid" ] && pid=$(cat "$logdir/gym.pid")
  # A stale pid file must not make us signal an unrelated process that reused the PID.
  # (-ww: ps cuts args at $COLUMNS, which pytest sets to 80, and a long venv path then hides
  # 'gym env start': the stop used to skip gym and leave its whole stack running.)
  if [ -n "$pid" ] && ps -o stat= -p "$pid" 2>/dev/null | grep -qv '^Z' \
      && ! ps -ww -o args= -p "$pid" | grep -q 'gym env start'; then
    echo "gym_env.sh: pid $pid is not gym env start any more; not signalling it" >&2
    pid=""
  fi
  [ -f "$logdir/ray.tmpdir" ] && raydir=$(cat "$logdir/ray.tmpdir")
  local timeout=${GYM_STOP_TIMEOUT:-30}

  if [ -n "$pid" ]; then
    # 1. SIGINT to gym's main process only: it SIGINTs each server's `bash -c` wrapper (SIGKILL
    #    after 1 s, which orphans the `python app.py` + `tee` under it), stops its head server,
    #    and shuts its Ray cluster down from an atexit hook (ray.shutdown()).
    kill -INT "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + timeout))
    while [ $SECONDS -lt $deadline ] && ps -o stat= -p "$pid" 2>/dev/null | grep -qv '^Z'; do sleep 0.2; done
    # 2. Whatever is left in the session (the orphaned servers, any Ray process), by PID.
    local p
    for p in $(session_pids "$pid") $(ray_pids "$raydir"); do kill -TERM "$p" 2>/dev/null || true; done
    if ! wait_gone 10 "$pid" "$raydir"; then
      for p in $(session_pids "$pid") $(ray_pids "$raydir"); do kill -KILL "$p" 2>/dev/null || true; done
      wait_gone 5 "$pid" "$raydir" || true
    fi
  fi
  local left
  left="$( { if [ -n "$pid" ]; then session_pids "$pid"; fi; ray_pids "$raydir"; } | paste -sd, -)"
  if [ -n "$left" ]; then
    ps -ww -o pid,pgid,sid,args -p "$left" >&2 || true
    die "processes left behind: $left"
  fi
  # Ray's temp dir (sessions, logs, sockets); /tmp/ray is untouched because RAY_TMPDIR was private.
  case "$raydir" in /tmp/gymray.*) rm -rf "$raydir" ;; esac
  rm -f "$logdir/gym.pid" "$logdir/ray.tmpdir"
}

case "${1:-}" in
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  *) die "usage: gym_env.sh start GYM_VENV MODEL_URL MODEL_NAME LOGDIR | stop LOGDIR" ;;
esac
