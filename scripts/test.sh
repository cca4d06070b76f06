#!/usr/bin/env bash
# The test command of the README's Quick start (and of CI): installs what it needs, then runs every test.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"` or `bash scripts/test.sh -k gmm`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$NLIP_ROOT"
exec python -m pytest "$@"
