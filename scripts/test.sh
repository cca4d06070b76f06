#!/usr/bin/env bash
# The test command of the README's Quick start (and of CI): installs what it needs, then runs every test.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"` or `bash scripts/test.sh -k gmm`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$NLIP_ROOT"
# The TensorBoard browser test opens the UI in headless Chromium: install Debian's package where we can.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[nlip-ds] installing Debian's chromium for the TensorBoard browser test" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) \
    >/dev/null 2>&1 || echo "[nlip-ds] could not install chromium; the browser test will be skipped" >&2
fi
# The SLURM tests (tests/test_slurm.py) start slurmctld/slurmd on localhost: install Debian's packages likewise.
if ! command -v slurmctld >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[nlip-ds] installing Debian's slurm-wlm and munge for the SLURM tests" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm \
    munge) >/dev/null 2>&1 || echo "[nlip-ds] could not install slurm-wlm/munge; the SLURM tests will be skipped" >&2
fi
exec python -m pytest "$@"
