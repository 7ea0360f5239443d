#!/usr/bin/env bash
# Start a real Flower deployment on this machine's loopback: one SuperLink and N SuperNodes,
# each its own process tree with its own working directory and FLWR_HOME, as if each ran on
# its own machine. For trying the deployment guide (docs/deployment.md) without a LAN.
#
#   scripts/deploy_local.sh [options] [-- COMMAND ...]
#
# Options:
#   --nodes N         SuperNodes to start (default 2); node i gets
#                     --node-config "partition-id=i num-partitions=N"
#   --data-dir DIR    instead, node i gets --node-config "data-path='DIR/node-i.npz'" (or
#                     DIR/node-i/ when that folder exists; see simulations/node_data.py)
#   --port P          SuperLink port (default: a free one); SuperNode i uses a free port too
#   --insecure        plain HTTP; default is TLS with certificates from scripts/make_certs.sh
#   --dir DIR         where everything goes (default: a new folder under /tmp)
#
# Without COMMAND it prints how to submit a run and waits until Ctrl-C. With COMMAND it runs it
# from the repository root once every SuperNode has connected (e.g.
# `-- flwr run . cmd-fl-local --stream --run-config "dataset='digits' num-server-rounds=5"`),
# then stops everything; the script's exit status is the command's. Either way every process
# it started is stopped by PID on exit (SuperExec and app processes included).
#
# Inside DIR: certs/ (TLS), flwr-home/config.toml (the `cmd-fl-local` connection for `flwr`),
# superlink/ and node-i/ (working directories and FLWR_HOMEs), superlink.log, node-i.log.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV_BIN="$REPO/.venv/bin"
NODES=2
PORT=""
TLS=1
DIR=""
DATA_DIR=""
COMMAND=()
while [ "$#" -gt 0 ]; do
    case "$1" in
        --nodes) NODES="$2"; shift 2 ;;
        --port) PORT="$2"; shift 2 ;;
        --insecure) TLS=0; shift ;;
        --dir) DIR="$2"; shift 2 ;;
        --data-dir) DATA_DIR="$(cd "$2" && pwd)"; shift 2 ;;
        --) shift; COMMAND=("$@"); break ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "[deploy_local] unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ ! -x "$VENV_BIN/flower-superlink" ]; then
    echo "[deploy_local] $VENV_BIN/flower-superlink not found: run 'bash scripts/setup.sh'" >&2
    exit 2
fi
# SuperLink and SuperNodes start their SuperExec, ServerApp and ClientApp processes from PATH.
export PATH="$VENV_BIN:$PATH"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1  # the app runs in this .venv
export FLWR_DISABLE_UPDATE_CHECK=1

free_port() {
    "$VENV_BIN/python" -c \
        'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
DIR="${DIR:-$(mktemp -d "${TMPDIR:-/tmp}/cmd-fl-deploy.XXXXXX")}"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
PORT="${PORT:-$(free_port)}"
PIDS=()

descendants() {  # every process below PID $1
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        echo "$child"
        descendants "$child"
    done
}

stop_all() {
    local status=$? pid all=()
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do
        all+=("$pid" $(descendants "$pid"))
    done
    if [ "${#all[@]}" -gt 0 ]; then
        echo "[deploy_local] stopping PIDs ${all[*]}"
        kill -TERM "${all[@]}" 2>/dev/null || true
        for _ in $(seq 50); do  # up to 5 s for a clean exit
            kill -0 "${all[@]}" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "${all[@]}" 2>/dev/null || true
    fi
    exit "$status"
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

SUPERLINK_TLS=(--insecure)
SUPERNODE_TLS=(--insecure)
CONNECTION_TLS='insecure = true'
if [ "$TLS" = 1 ]; then
    bash "$REPO/scripts/make_certs.sh" "$DIR/certs" >/dev/null
    SUPERLINK_TLS=(--ssl-ca-certfile "$DIR/certs/ca.crt" --ssl-certfile "$DIR/certs/server.crt"
                   --ssl-keyfile "$DIR/certs/server.key")
    SUPERNODE_TLS=(--root-certificates "$DIR/certs/ca.crt")
    CONNECTION_TLS="root-certificates = \"$DIR/certs/ca.crt\""
fi

mkdir -p "$DIR/superlink"
(
    cd "$DIR/superlink"
    FLWR_HOME="$DIR/superlink" exec flower-superlink "${SUPERLINK_TLS[@]}" \
        --host 127.0.0.1 --port "$PORT" --disable-runtime-dependency-installation \
        >"$DIR/superlink.log" 2>&1
) &
PIDS+=("$!")
echo "[deploy_local] SuperLink on 127.0.0.1:$PORT (PID $!, log $DIR/superlink.log)"
for _ in $(seq 150); do  # up to about 30 s
    grep -q "Application startup complete" "$DIR/superlink.log" 2>/dev/null && break
    kill -0 "${PIDS[0]}" 2>/dev/null || { cat "$DIR/superlink.log" >&2; exit 1; }
    sleep 0.2
done
grep -q "Application startup complete" "$DIR/superlink.log" || {
    echo "[deploy_local] the SuperLink did not start in 30 s; see $DIR/superlink.log" >&2
    exit 1
}

for i in $(seq 0 $((NODES - 1))); do
    NODE_CONFIG="partition-id=$i num-partitions=$NODES"
    if [ -n "$DATA_DIR" ]; then
        DATA_PATH="$DATA_DIR/node-$i.npz"
        if [ -d "$DATA_DIR/node-$i" ]; then
            DATA_PATH="$DATA_DIR/node-$i"
        elif [ ! -f "$DATA_PATH" ]; then
            echo "[deploy_local] neither $DATA_PATH nor $DATA_DIR/node-$i/ exists" >&2
            exit 2
        fi
        NODE_CONFIG="data-path='$DATA_PATH'"
    fi
    mkdir -p "$DIR/node-$i"
    (
        cd "$DIR/node-$i"
        FLWR_HOME="$DIR/node-$i" exec flower-supernode "${SUPERNODE_TLS[@]}" \
            --superlink "127.0.0.1:$PORT" --port "$(free_port)" --node-config "$NODE_CONFIG" \
            >"$DIR/node-$i.log" 2>&1
    ) &
    PIDS+=("$!")
    echo "[deploy_local] SuperNode $i: $NODE_CONFIG (PID $!, log $DIR/node-$i.log)"
done
for i in $(seq 0 $((NODES - 1))); do  # each logs its node id once registered
    for _ in $(seq 300); do  # up to about 60 s
        grep -q "SuperNode ID" "$DIR/node-$i.log" 2>/dev/null && break
        sleep 0.2
    done
    grep -q "SuperNode ID" "$DIR/node-$i.log" || {
        echo "[deploy_local] SuperNode $i did not connect; see $DIR/node-$i.log" >&2
        exit 1
    }
done

mkdir -p "$DIR/flwr-home"
cat >"$DIR/flwr-home/config.toml" <<EOF
[superlink]
default = "cmd-fl-local"

[superlink.cmd-fl-local]
address = "127.0.0.1:$PORT"
$CONNECTION_TLS
EOF
export FLWR_HOME="$DIR/flwr-home"
echo "[deploy_local] $NODES SuperNodes connected; connection 'cmd-fl-local' in $FLWR_HOME/config.toml"

if [ "${#COMMAND[@]}" -gt 0 ]; then
    cd "$REPO"
    set +e
    "${COMMAND[@]}"
    status=$?
    set -e
    exit "$status"
fi
echo "[deploy_local] submit a run from another shell:"
echo "    cd $REPO && FLWR_HOME=$FLWR_HOME .venv/bin/flwr run . cmd-fl-local --stream \\"
echo "        --run-config \"dataset='digits' num-server-rounds=5 num-partitions=$NODES\""
echo "[deploy_local] Ctrl-C stops everything"
while kill -0 "${PIDS[0]}" 2>/dev/null; do
    sleep 1
done
echo "[deploy_local] the SuperLink exited; see $DIR/superlink.log" >&2
exit 1
