#!/usr/bin/env bash
# Runs on every TPU VM of a slice; launch/tpu.sh calls it over `gcloud ... ssh --worker=all`.
#   tpu_worker.sh install PYTHON_VERSION   swap in ~/mmar_jax_new as ~/mmar_jax, install it
#   tpu_worker.sh start COMMAND ARGS...    start `mmar-jax COMMAND ARGS` (train, prepare-data,
#                                          eval fid, ...) in the background
#   tpu_worker.sh stream                   print the log until the command ends
#   tpu_worker.sh status                   the exit status, "running" or "lost"
# State lives in ~/mmar_run (log, pid, exit status), so a re-run of the launcher attaches to a
# command that is still going instead of starting a second one on the same chips.
set -euo pipefail

SRC="$HOME/mmar_jax"
VENV="$HOME/mmar_venv"
RUN="$HOME/mmar_run"
mkdir -p "$RUN"

running() {
  [ -f "$RUN/pid" ] && kill -0 "$(cat "$RUN/pid")" 2>/dev/null
}

install() {
  local python_version="$1"
  if running; then
    echo "$(hostname): training is running; keeping the installed code"
    return 0
  fi
  rm -rf "$SRC" && mv "$HOME/mmar_jax_new" "$SRC"
  # TPU VM images ship Python 3.10; jax 0.10 needs 3.11+, which uv fetches.
  python3 -m pip install --user --quiet --upgrade uv
  local uv="$HOME/.local/bin/uv"
  [ -x "$VENV/bin/python" ] || "$uv" venv --quiet --python "$python_version" "$VENV"
  "$uv" pip install --quiet --python "$VENV/bin/python" -r "$SRC/requirements-tpu.txt"
  "$uv" pip install --quiet --python "$VENV/bin/python" --no-deps -e "$SRC"
  # A plain CPU jax would train on the host CPU; a gs:// workdir needs gcsfs.
  "$VENV/bin/python" - <<'EOF'
import importlib.metadata as md, gcsfs, libtpu  # noqa: F401
import jax
print(f"jax {jax.__version__}, libtpu {md.version('libtpu')}, gcsfs {gcsfs.__version__}")
EOF
}

start() {
  if running; then
    echo "$(hostname): mmar-jax is already running (pid $(cat "$RUN/pid")); attaching"
    return 0
  fi
  rm -f "$RUN/exit_code"
  cd "$SRC"
  # setsid + nohup: the command outlives the ssh session that started it.
  MMAR_DISTRIBUTED=auto setsid nohup bash -c \
    '"$0" "$@"; echo $? > "$HOME/mmar_run/exit_code"' "$VENV/bin/mmar-jax" "$@" \
    > "$RUN/run.log" 2>&1 < /dev/null &
  echo $! > "$RUN/pid"
  echo "$(hostname): started mmar-jax $1 (pid $!)"
}

stream() {
  local pid
  pid="$(cat "$RUN/pid")"
  tail -n +1 -F -s 0.5 "$RUN/run.log" --pid="$pid" 2>/dev/null
}

status() {
  if [ -f "$RUN/exit_code" ]; then
    cat "$RUN/exit_code"
  elif running; then
    echo running
  else
    echo lost  # killed without writing a status: preempted or out of memory
  fi
}

cmd="${1:?usage: tpu_worker.sh install|start|stream|status [ARGS...]}"
shift
case "$cmd" in
  install) install "${1:?python version}" ;;
  start) start "$@" ;;
  stream) stream ;;
  status) status ;;
  *) echo "tpu_worker.sh: unknown command $cmd" >&2; exit 2 ;;
esac
