#!/usr/bin/env bash
# Run the cmd-fl Flower app as a local Ray simulation through the real `flwr run`, then stop
# everything it started.
#
#   scripts/run_simulation.sh [flwr run options, e.g. --run-config "num-server-rounds=10"]
#
# Environment (all optional):
#   CMD_FL_SUPERNODES      simulated SuperNodes (default 10)
#   CMD_FL_CLIENT_CPUS     CPUs reserved per ClientApp in Ray (default 1)
#   CMD_FL_SUPERLINK_PORT  port of the SuperLink's HTTP API (default: a free port)
#   FLWR_HOME              Flower's home: connection config, installed apps, SuperLink log
#                          (default: .flwr/ in the repository root, git-ignored)
#   CMD_FL_BIN             folder with flwr, flower-superlink and python (default: .venv/bin)
#   CMD_FL_APP             the Flower app folder to run (default: the repository root, the
#                          cmd-fl app; e.g. examples/quickstart)
#
# Why not let `flwr run` start its managed SuperLink: that one listens on a fixed port (39091),
# detaches, and outlives the command. This script starts the same SuperLink itself (simulation
# mode, subprocess isolation, in-memory state) on its own port, points `flwr run`'s `local`
# connection at it (FLWR_LOCAL_SUPERLINK_HTTP_API_PORT), and stops it by PID on exit, so that
# runs with different ports and FLWR_HOMEs never collide. Runtime dependency installation is
# off: the app runs in this repository's .venv (uv would fetch a multi-GB CUDA torch).
#
# Exit status: non-zero when the SuperLink cannot start, `flwr run` fails, or the ServerApp did
# not write its results (Flower itself reports a run whose ClientApps raised as completed).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV_BIN="${CMD_FL_BIN:-$REPO/.venv/bin}"
if [ ! -x "$VENV_BIN/flwr" ]; then
    echo "[run_simulation] $VENV_BIN/flwr not found: run 'bash scripts/setup.sh' first" >&2
    exit 2
fi
# The SuperLink finds flower-superexec, flwr-simulation and flwr-serverapp on PATH.
export PATH="$VENV_BIN:$PATH"
export FLWR_HOME="${FLWR_HOME:-$REPO/.flwr}"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_DISABLE_UPDATE_CHECK=1
SUPERNODES="${CMD_FL_SUPERNODES:-10}"
CLIENT_CPUS="${CMD_FL_CLIENT_CPUS:-1}"
PORT="${CMD_FL_SUPERLINK_PORT:-$("$VENV_BIN/python" -c \
    'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
export FLWR_LOCAL_SUPERLINK_HTTP_API_PORT="$PORT"
export FLWR_LOCAL_CONTROL_API_PORT="$PORT"  # unused over HTTP; keeps 39093 free

mkdir -p "$FLWR_HOME/local-superlink"
SUPERLINK_LOG="$FLWR_HOME/local-superlink/superlink-$PORT.log"
RUN_LOG="$(mktemp "${TMPDIR:-/tmp}/cmd-fl-run.XXXXXX")"
SUPERLINK_PID=""

descendants() {  # all processes below PID $1, deepest last
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        echo "$child"
        descendants "$child"
    done
}

stop_superlink() {
    local status=$? pids pid
    trap - EXIT INT TERM
    if [ -n "$SUPERLINK_PID" ] && kill -0 "$SUPERLINK_PID" 2>/dev/null; then
        echo "[run_simulation] stopping SuperLink (PID $SUPERLINK_PID)"
        pids="$(descendants "$SUPERLINK_PID")"
        kill -TERM "$SUPERLINK_PID" 2>/dev/null || true
        for _ in $(seq 100); do  # it stops SuperExec, which stops the simulation (10 s at most)
            kill -0 "$SUPERLINK_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$SUPERLINK_PID" 2>/dev/null || true
        sleep 0.5
        for pid in $pids; do kill -KILL "$pid" 2>/dev/null || true; done
    fi
    rm -f "$RUN_LOG"
    exit "$status"
}
trap stop_superlink EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "[run_simulation] FLWR_HOME=$FLWR_HOME, SuperLink on 127.0.0.1:$PORT," \
     "$SUPERNODES SuperNodes, $CLIENT_CPUS CPU(s) each"
# The same command `flwr run` uses for its managed SuperLink, started from FLWR_HOME so that
# nothing lands in the caller's working directory.
(
    cd "$FLWR_HOME"
    exec "$VENV_BIN/flower-superlink" --insecure --simulation --isolation subprocess \
        --host 127.0.0.1 --port "$PORT" --disable-runtime-dependency-installation \
        --log-file "$SUPERLINK_LOG" >/dev/null 2>&1
) &
SUPERLINK_PID=$!

superlink_ready() {
    "$VENV_BIN/python" -c "import sys, urllib.request as u
sys.exit(u.urlopen('http://127.0.0.1:$PORT/health', timeout=0.5).status != 200)" 2>/dev/null
}
for _ in $(seq 150); do  # up to about 30 s
    if ! kill -0 "$SUPERLINK_PID" 2>/dev/null; then
        echo "[run_simulation] SuperLink exited at start-up; see $SUPERLINK_LOG" >&2
        tail -n 20 "$SUPERLINK_LOG" >&2 || true
        exit 1
    fi
    superlink_ready && break
    sleep 0.2
done
# Without a ready SuperLink on PORT, `flwr run` would start an unmanaged one of its own.
if ! superlink_ready; then
    echo "[run_simulation] SuperLink not ready on port $PORT after 30 s; see $SUPERLINK_LOG" >&2
    exit 1
fi

APP="$(cd "${CMD_FL_APP:-$REPO}" && pwd)"
cd "$REPO"
"$VENV_BIN/flwr" run "$APP" local --stream \
    --federation-config "num-supernodes=$SUPERNODES client-resources-num-cpus=$CLIENT_CPUS" \
    "$@" 2>&1 | tee "$RUN_LOG"

if ! grep -q '^\[cmd-fl\] results written to ' "$RUN_LOG"; then
    echo "[run_simulation] FAILED: the ServerApp did not write its results (see the log above" \
         "and $SUPERLINK_LOG)" >&2
    exit 1
fi
