# Create or reuse the project's virtual environment (.venv) and install nlip-ds into it.
# Sourced by scripts/demo.sh and scripts/test.sh. A second run reinstalls nothing unless setup.py or this
# file changed (a stamp in .venv records their hash).
set -euo pipefail
NLIP_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NLIP_VENV:-$NLIP_ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

# cpp_extension finds the toolkit through CUDA_HOME: the folder above nvcc's bin/ that holds the headers too.
# nvcc on PATH may be a wrapper script (as in /usr/local/bin here), so check each candidate for a toolkit.
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
  for candidate in "$(cd "$(dirname "$(readlink -f "$(command -v nvcc)")")/.." && pwd)" /usr/local/cuda /opt/cuda; do
    if [ -x "$candidate/bin/nvcc" ] && [ -f "$candidate/include/cuda_runtime.h" ]; then
      export CUDA_HOME="$candidate"
      break
    fi
  done
fi

stamp_of() { cat "$NLIP_ROOT/setup.py" "$NLIP_ROOT/scripts/env.sh" "$NLIP_ROOT"/kernels/*.{cpp,cu,h} 2>/dev/null \
  | sha256sum | cut -c1-16; }

if [ ! -x "$VENV/bin/python" ]; then
  echo "[nlip-ds] creating virtual environment $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
want="$(stamp_of)"
if [ "$(cat "$VENV/.nlip-ds-stamp" 2>/dev/null)" != "$want" ]; then
  echo "[nlip-ds] installing nlip-ds and its dependencies into $VENV (first run: several minutes)" >&2
  # torch's CUDA build and its libraries take about 6 GiB installed, and pip holds their wheels (3.4 GiB) until
  # the install ends; no pip cache, so they are not kept twice. Too little disk fails the install with pip's
  # "No space left on device": say how much there is first.
  export PIP_NO_CACHE_DIR=1
  free_gib="$(df -Pk "$(dirname "$VENV")" | awk 'NR==2 {print int($4 / 1048576)}')"
  if [ "${free_gib:-0}" -lt 10 ]; then
    echo "[nlip-ds] warning: $free_gib GiB free under $(dirname "$VENV"); the first install needs about 10 GiB" >&2
  fi
  "$VENV/bin/pip" install -q --upgrade pip setuptools wheel ninja
  # torch first: the extension build below compiles against it. torch===2.13.0 (three '=') takes the
  # registry's standard build even where pip is pointed at a local CPU-only wheel of the same version.
  "$VENV/bin/pip" install -q "torch===2.13.0" "torchvision===0.28.0"
  "$VENV/bin/pip" install -q --no-build-isolation -e "$NLIP_ROOT[eval,test]"
  echo "$want" > "$VENV/.nlip-ds-stamp"
fi
export PATH="$VENV/bin:$PATH"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
