#!/usr/bin/env bash
# The GPU check of issue 19 (what it measures: benchmarks/gpu_check.py). From the repository root:
#
#   benchmarks/gpu_check.sh wheels     here, with a package index: download into .whl/ the wheels
#                                      the GPU machine lacks (fedlora.data needs datasets and
#                                      flwr-datasets, QLoRA bitsandbytes, whose wheel carries its CUDA
#                                      kernels; Flower itself is not needed, its tests are left out)
#   benchmarks/gpu_check.sh            on the GPU machine (carry .whl): about 7.5 minutes, writes
#                                      benchmarks/results/gpu.md, and $OUT/gpu.md, gpu.json and logs
#   benchmarks/gpu_check.sh --dry-run  anywhere: every part at tiny shapes, to check the script itself
#
# With the device tool: run(command="benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540), then
# copy $OUT's gpu.md to benchmarks/results/gpu.md and commit it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# the versions of fedlora's environment here; pure Python wheels except multiprocess's (py312) and
# bitsandbytes' (manylinux_2_24, any Python 3)
WHEELS="datasets==4.8.5 flwr-datasets==0.6.1 dill==0.4.1 multiprocess==0.70.19 bitsandbytes==0.50.2"

if [ "${1:-}" = wheels ]; then
    # shellcheck disable=SC2086
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 \
        -d .whl $WHEELS
    exit
fi

if compgen -G ".whl/*.whl" > /dev/null; then
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/fedlora-site .whl/*.whl; then
        export PYTHONPATH=/tmp/fedlora-site${PYTHONPATH:+:$PYTHONPATH}
    else  # the report says what then fails to import
        echo "gpu_check: the wheels in .whl/ did not install; going on without them" >&2
    fi
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>/dev/null || true
# the script keeps its own deadline (7.5 min); this is a backstop a minute later
exec timeout 510 "$PYTHON" benchmarks/gpu_check.py "$@"
