#!/usr/bin/env bash
# Set-up on the GPU machine (no network): the wheels carried in .whl/ (diffusers,
# torchao for the stock fp8 row, grpcio health/reflection, optionally sageattention and controlnet_aux), this package
# in editable mode, and the tiny preset for tokenizers and configs at /tmp/tiny.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i warn || true
[ -d /tmp/tiny/flux ] || python3 -m qwen2vl_flux.client.cli make-tiny-checkpoints /tmp/tiny > /dev/null 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
