#!/usr/bin/env bash
# Issue #16's device benchmark, ≤ 8 minutes on the lent H200 (one GPU, 16 cores, no network):
#   bash bench/device/run.sh                 # ViT-B/16, ResNet-50, EfficientNet-B0, CvT-13; JSON lines on stdout
#   bash bench/device/run.sh --cpu-smoke     # the same code path on CPU, small configs (< 2 minutes)
# Extra arguments go to bench/device/bench.py (--models, --seconds, --compile-budget, --no-torch-compile, ...).
# With $OUT set the lines are also written to $OUT/bench_device.json.
#
# The H200's python3 has jax (+ CUDA plugin), flax, optax, orbax, transformers and torch, but not the few packages
# jaxmed's train/data imports need. They travel as wheels in bench/device/wheels/ (git-ignored): fill it here,
# once, with
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d bench/device/wheels grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 ml-collections==1.1.0
# and name it in the device call's carry: run(command="bash bench/device/run.sh", carry=["bench/device/wheels"]).
set -euo pipefail
cd "$(dirname "$0")/../.."

smoke=0
for arg in "$@"; do [[ "$arg" == "--cpu-smoke" ]] && smoke=1; done

if [[ -n "${PYTHON:-}" ]]; then py="$PYTHON"
elif [[ $smoke == 1 && -x .venv/bin/python ]]; then py=.venv/bin/python
else py=python3; fi

if ! "$py" -c "import grain, ml_collections, portpicker, array_record" 2>/dev/null; then
  shopt -s nullglob
  wheels=(bench/device/wheels/*.whl)
  if (( ${#wheels[@]} == 0 )); then
    echo "run.sh: grain/ml_collections missing and bench/device/wheels/ is empty; see the header of $0" >&2
    exit 2
  fi
  target=/tmp/jaxmed-device-site
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" "${wheels[@]}"
  export PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}"
fi

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [[ $smoke == 1 ]]; then
  export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=""
  exec timeout 170 "$py" bench/device/bench.py --input-images 24 --input-seconds 1 --input-batch 8 --seconds 0.5 \
    --compile-budget 15 --reserve 5 "$@"
fi
# JAX takes 45% of the GPU's memory, PyTorch (same process, then a torch.compile child) the rest.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}"
"$py" -c "import jax, flax, optax, torch, transformers; print('versions: jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, jax.devices())" >&2
exec timeout 470 "$py" bench/device/bench.py "$@"
