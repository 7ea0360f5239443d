#!/usr/bin/env bash
# One set-up path for a fresh machine: .venv/ in the repository root, the project in editable mode
# with its dev extra, and the Fashion-MNIST Debian package where it can be installed.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)

if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
    echo "[setup] installing torch and torchvision (from this machine's wheels where pip finds them)"
    "${PIP[@]}" install "torch==2.14.1" "torchvision==0.29.1" \
        || "${PIP[@]}" install "torch>=2.2,<2.15" "torchvision>=0.17,<0.30"
fi
if ! .venv/bin/python -c "import cmd_fl, flwr, pytest" 2>/dev/null \
        || [ pyproject.toml -nt .venv/.cmd-fl-installed ]; then
    echo "[setup] installing cmd-fl (editable) with the dev extra"
    "${PIP[@]}" install -e ".[dev]"
    touch .venv/.cmd-fl-installed
fi

FMNIST_DIR=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "[setup] installing the Fashion-MNIST Debian package (dataset-fashion-mnist)"
        (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
            || echo "[setup] WARNING: apt-get could not install dataset-fashion-mnist"
    fi
fi
if [ ! -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ]; then
    echo "[setup] Fashion-MNIST not found in $FMNIST_DIR. Install it with" \
         "'sudo apt-get install dataset-fashion-mnist', or put the four idx files under" \
         "\$CMD_FL_DATA/FashionMNIST/raw/. The 'digits' dataset works without it."
fi
echo "[setup] ready: .venv/bin/python $(.venv/bin/python -c 'import sys; print(sys.version.split()[0])')"
