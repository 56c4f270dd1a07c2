#!/usr/bin/env bash
# Static checks (docs/development.md): ruff (lint, import order), mypy (types), lint-imports
# (layer contracts). Their configuration is in pyproject.toml. Prints one line per tool and
# exits non-zero if any fails; every tool runs, so one run shows every kind of finding.
#   bash scripts/check.sh              # after `bash scripts/setup.sh`
#   VENV=/path/to/venv bash scripts/check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
bin=${VENV:-.venv}/bin
failed=0
run() {  # run NAME COMMAND...: the tool's own output only when it fails
    local name=$1 out
    shift
    if out=$("$@" 2>&1); then
        echo "check: $name ok"
    else
        printf '%s\n' "$out"
        echo "check: $name FAILED ($*)"
        failed=1
    fi
}
run ruff "$bin/ruff" check --quiet .
run mypy "$bin/mypy"
run lint-imports "$bin/lint-imports" --no-cache
exit $failed
