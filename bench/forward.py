"""Eval-mode forward throughput, jaxmed vs HF PyTorch, same machine, same run, same random-init weights.

    python bench/forward.py [--models vit-b16 resnet50 ...] [--batch 8] [--seconds 10]

One JSON line per model: {"model", "jaxmed", "reference", "unit": "img/s", "ratio": jaxmed/reference, ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from jaxmed.convert import from_pretrained  # noqa: E402


def _configs():
    """Full-size reference architectures as (transformers model class, config), built without the hub."""
    return {
        "vit-b16": (transformers.ViTForImageClassification, transformers.ViTConfig()),
        "resnet50": (transformers.ResNetForImageClassification, transformers.ResNetConfig()),
        "cvt13": (transformers.CvtForImageClassification, transformers.CvtConfig()),
        "efficientnet-b0": (transformers.EfficientNetForImageClassification,
                            transformers.EfficientNetConfig(width_coefficient=1.0, depth_coefficient=1.0,
                                                            image_size=224, dropout_rate=0.2, hidden_dim=1280)),
    }


def _rate(run, batch: int, seconds: float, warmup: int = 2) -> float:
    for _ in range(warmup):
        run()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run()
        count += 1
    return count * batch / (time.perf_counter() - start)


def bench(name: str, batch: int, seconds: float) -> dict:
    model_class, config = _configs()[name]
    torch.manual_seed(0)
    reference = model_class(config).eval()
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        model = from_pretrained(directory)
    x = np.random.RandomState(0).randn(batch, 3, 224, 224).astype(np.float32)
    x_torch, x_jax = torch.from_numpy(x), jax.device_put(np.transpose(x, (0, 2, 3, 1)))

    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, pixels):
        return nnx.merge(graphdef, state)(pixels)

    def run_jax():
        forward(state, x_jax).block_until_ready()

    def run_torch():
        with torch.inference_mode():
            reference(x_torch)

    with torch.inference_mode():
        max_diff = float(np.abs(np.asarray(forward(state, x_jax)) - reference(x_torch).logits.numpy()).max())
    ours, theirs = _rate(run_jax, batch, seconds), _rate(run_torch, batch, seconds)
    return {"model": name, "jaxmed": round(ours, 2), "reference": round(theirs, 2), "unit": "img/s",
            "ratio": round(ours / theirs, 3), "batch": batch, "image_size": 224, "dtype": "float32",
            "max_abs_logit_diff": max_diff, "torch_threads": torch.get_num_threads(),
            "devices": f"{jax.device_count()}x{jax.devices()[0].platform}"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(_configs()), choices=list(_configs()))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per framework and model")
    args = parser.parse_args(argv)
    for name in args.models:
        print(json.dumps(bench(name, args.batch, args.seconds)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
