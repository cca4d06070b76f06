#!/usr/bin/env bash
# Fill the git-ignored wheel folder (default .whl/) with what the offline GPU machine's Python 3.12 lacks for
# nlip-ds: DeepSpeed (built here as a pure-Python wheel, DS_BUILD_OPS=0: its ops compile just in time there) and
# the dependencies its image does not hold, and webdataset with braceexpand. Run it where PyPI is reachable,
# then let scripts/gpu_check.sh install them on the GPU machine (docs/performance.md, "GPU check").
#
#   scripts/gpu_wheels.sh [DEST]         # about 3 MB; refuses to leave more than 64 MB
#
# The GPU image already has torch, numpy, packaging, psutil, py-cpuinfo, tqdm, msgpack, ninja, einops,
# nvidia-ml-py, typing-extensions, pyyaml, timm, transformers, tokenizers, safetensors, tensorboard, pillow and
# matplotlib (the device library's KINDS.md); carrying a second copy of any of them would break that install.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PYTHON=${PYTHON:-python3}
DEEPSPEED=deepspeed==0.19.8
# Binary wheels for CPython 3.12 on manylinux x86-64 (pydantic-core is the only compiled one).
WHEELS=(hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.7.0 typing-inspection==0.4.2
        webdataset==1.0.2 braceexpand==0.1.7)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done

mkdir -p "$DEST"
echo "gpu_wheels: downloading ${WHEELS[*]} into $DEST"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" "${WHEELS[@]}"

if ! ls "$DEST"/deepspeed-*.whl >/dev/null 2>&1; then
  echo "gpu_wheels: building a pure-Python $DEEPSPEED wheel (DS_BUILD_OPS=0; needs torch in $PYTHON)"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$PYTHON" -m pip download -q --no-deps --no-binary=:all: -d "$work" "$DEEPSPEED"
  DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$work"/deepspeed-*.tar.gz
fi

total=$(du -sm "$DEST" | cut -f1)
ls -1 "$DEST"
echo "gpu_wheels: $(ls "$DEST" | wc -l) wheels, ${total} MB in $DEST"
if [ "$total" -gt 64 ]; then
  echo "gpu_wheels: error: $DEST holds ${total} MB, over the 64 MB a GPU call can carry" >&2
  exit 1
fi
