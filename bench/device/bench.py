"""Train-step throughput on one accelerator: jaxmed (bf16 compute, fp32 master weights) vs HF PyTorch under
`torch.autocast(bfloat16)`, eager and `torch.compile`d, same GPU, same run, same random-init weights; MFU against
a bf16 matmul peak measured in the run; the input pipeline's img/s on all cores.

    python bench/device/bench.py                 # ViT-B/16, ResNet-50, EfficientNet-B0, CvT-13 at 224², batch 256
    python bench/device/bench.py --cpu-smoke     # the same code path on CPU: small configs, 64², batch 2

Run through bench/device/run.sh (it installs the carried wheels). One JSON line per model on stdout and, when $OUT
is set, in $OUT/bench_device.json:
  {"model", "jaxmed", "reference", "unit": "img/s", "ratio", "mfu", "reference_mfu", "reference_compiled",
   "ratio_compiled", "step_tflop", "peak_tflops", "batch", "image_size", "input_img_s", "targets", ...}
"reference" is PyTorch eager + autocast; "reference_compiled" is torch.compile (null with the reason when it did not
compile within --compile-budget seconds). MFU: the step's FLOPs (XLA's cost analysis of the jaxmed step lowered with
the XLA attention, which counts attention; used for both frameworks) per second over the measured peak. Targets
(issue #16): ViT-B/16 MFU ≥ 0.5, every model ≥ 1.2× PyTorch eager autocast, input ≥ the fastest model's img/s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path[:0] = [str(ROOT), str(HERE.parent)]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from jaxmed.convert import from_pretrained  # noqa: E402
from jaxmed.models import kernels  # noqa: E402
from jaxmed.train import step_function  # noqa: E402

LR, CLIP, WEIGHT_DECAY = 2e-5, 1.0, 0.01
MODELS = ("vit-b16", "resnet50", "efficientnet-b0", "cvt13")
B0 = dict(width_coefficient=1.0, depth_coefficient=1.0, image_size=224, dropout_rate=0.2, hidden_dim=1280)


def configs(smoke: bool) -> dict:
    """(HF model class, config, batch) per model: full size, or small ones of the same architectures (--cpu-smoke)."""
    if not smoke:
        return {
            "vit-b16": (transformers.ViTForImageClassification, transformers.ViTConfig(num_labels=4), 256),
            "resnet50": (transformers.ResNetForImageClassification, transformers.ResNetConfig(num_labels=4), 256),
            "efficientnet-b0": (transformers.EfficientNetForImageClassification,
                                transformers.EfficientNetConfig(**B0, num_labels=4), 256),
            "cvt13": (transformers.CvtForImageClassification, transformers.CvtConfig(num_labels=4), 128),
        }
    return {
        "vit-b16": (transformers.ViTForImageClassification,
                    transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=128, image_size=64, patch_size=16, num_labels=4), 2),
        "resnet50": (transformers.ResNetForImageClassification,
                     transformers.ResNetConfig(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1],
                                               num_labels=4), 2),
        "efficientnet-b0": (transformers.EfficientNetForImageClassification,
                            transformers.EfficientNetConfig(
                                width_coefficient=0.5, depth_coefficient=1.0, image_size=64, in_channels=[32, 16],
                                out_channels=[16, 24], kernel_sizes=[3, 5], strides=[1, 2], num_block_repeats=[1, 2],
                                expand_ratios=[1, 6], hidden_dim=640, dropout_rate=0.2, num_labels=4), 2),
        "cvt13": (transformers.CvtForImageClassification,  # two stages, the second with the cls token (CvT-13's)
                  transformers.CvtConfig(
                      embed_dim=[16, 32], num_heads=[1, 2], depth=[1, 2], mlp_ratio=[4.0, 4.0], patch_sizes=[7, 3],
                      patch_stride=[4, 2], patch_padding=[2, 1], qkv_bias=[True, True], cls_token=[False, True],
                      qkv_projection_method=["dw_bn", "dw_bn"], kernel_qkv=[3, 3], padding_kv=[1, 1],
                      stride_kv=[2, 2], padding_q=[1, 1], stride_q=[1, 1], drop_rate=[0.0, 0.0],
                      attention_drop_rate=[0.0, 0.0], drop_path_rate=[0.0, 0.1], num_labels=4), 2),
    }


def rate(run, batch: int, seconds: float, warmup: int = 2) -> float:
    """Images per second of `run` (which blocks until its step is done), after `warmup` calls."""
    for _ in range(warmup):
        run()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count < 3:
        run()
        count += 1
    return count * batch / (time.perf_counter() - start)


def matmul_peak(n: int, seconds: float) -> float:
    """FLOP/s of an n³ bf16 matmul (fp32 accumulation) in XLA on the default device, best of three windows."""
    a = jnp.asarray(np.random.RandomState(0).randn(n, n), jnp.bfloat16)
    matmul = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    return max(rate(lambda: matmul(a, a).block_until_ready(), 1, seconds / 3) for _ in range(3)) * 2 * n**3


def step_flops(step, state, batch) -> float:
    """FLOPs of the step, from XLA's cost analysis of it lowered with XLA's attention (cuDNN's custom call would
    count as none). Lowered only, never compiled."""
    with kernels.force_kernels("accelerator"):
        analysis = jax.jit(step).lower(state, batch).cost_analysis()
    if isinstance(analysis, list):  # older jax returned one dict per program
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))


def jaxmed_step(name: str, model_class, config, batch: int, size: int, seconds: float) -> dict:
    torch.manual_seed(0)
    reference = model_class(config)
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        model = from_pretrained(directory, dtype=jnp.bfloat16)
    rng = np.random.RandomState(0)
    images = rng.randn(batch, size, size, 3).astype(np.float32)
    labels = rng.randint(0, config.num_labels, batch).astype(np.int32)
    model.train()
    graph, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    tx = optax.chain(optax.clip_by_global_norm(CLIP), optax.adamw(LR, weight_decay=WEIGHT_DECAY))
    step = step_function(graph, rest, tx, lambda x: x, seed=0)
    state = {"params": params, "stats": stats, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    state = jax.device_put(state)
    arrays = jax.device_put({"image": images, "label": labels})
    flops = step_flops(step, state, arrays)
    started = time.perf_counter()
    jitted = jax.jit(step, donate_argnums=0)
    compiled = jitted.lower(state, arrays).compile()
    compile_s = time.perf_counter() - started
    text = compiled.as_text()
    kernels = {"cudnn_attention_calls": text.count("__cudnn$fmha"),
               "grouped_convolutions": sum(int(n) > 1 for n in re.findall(r"feature_group_count=(\d+)", text)),
               "conditionals": text.count("conditional(")}

    def run():
        nonlocal state
        state, metrics = compiled(state, arrays)
        metrics["loss"].block_until_ready()

    value = rate(run, batch, seconds)
    loss = float(jax.device_get(compiled(state, arrays)[1]["loss"]))
    state = arrays = compiled = None  # free the device memory before PyTorch runs
    return {"img_s": value, "flops": flops, "compile_s": compile_s, "loss": loss, "kernels": kernels,
            "images": images, "labels": labels, "reference": reference}


def torch_step(reference, images, labels, seconds: float, device: str, compile_model: bool = False) -> float:
    reference = reference.to(device).train()
    fused = device == "cuda"
    optimizer = torch.optim.AdamW(reference.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=fused)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device)
    y = torch.from_numpy(labels).long().to(device)
    forward = torch.compile(reference) if compile_model else reference

    def run():
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = forward(x).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    return rate(run, len(labels), seconds, warmup=3 if compile_model else 2)


def compiled_torch(name: str, args, budget: float) -> tuple[float | None, str]:
    """torch.compile'd PyTorch img/s from a child process killed after `budget` seconds."""
    if budget <= 10:
        return None, f"skipped: {budget:.0f} s left of the run's deadline"
    command = [sys.executable, __file__, "--torch-compile-worker", name, "--seconds", str(args.seconds)]
    if args.cpu_smoke:
        command.append("--cpu-smoke")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired:
        return None, f"did not compile and run within {budget:.0f} s"
    if done.returncode:
        return None, "failed: " + (done.stderr.strip().splitlines() or ["?"])[-1][:300]
    return json.loads(done.stdout.strip().splitlines()[-1])["img_s"], "ok"


def torch_compile_worker(name: str, args) -> None:
    model_class, config, batch = configs(args.cpu_smoke)[name]
    torch.manual_seed(0)
    reference = model_class(config)
    rng = np.random.RandomState(0)
    size = 64 if args.cpu_smoke else 224
    images = rng.randn(batch, size, size, 3).astype(np.float32)
    labels = rng.randint(0, config.num_labels, batch).astype(np.int32)
    device = "cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu"
    print(json.dumps({"img_s": torch_step(reference, images, labels, args.seconds, device, compile_model=True)}))


def input_pipeline(args, workers: int) -> dict:
    """jaxmed's grain pipeline (cache → augment → batch → jitted normalisation) on all cores: bench/input_pipeline.py's
    jaxmed measurement with `workers` worker processes, in a child process."""
    import input_pipeline as pipeline

    workdir = Path(tempfile.mkdtemp(prefix="jaxmed-device-input-"))
    pipeline.generate_jpegs(workdir / "jpegs", args.input_images)
    pipeline.build_cache(workdir)
    environment = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    command = [sys.executable, str(HERE.parent / "input_pipeline.py"), "--mode", "jaxmed", "--workdir", str(workdir),
               "--workers", str(workers), "--seconds", str(args.input_seconds), "--batch", str(args.input_batch)]
    done = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    if done.returncode:
        return {"input_img_s": None, "input_error": done.stderr.strip()[-300:]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"input_img_s": round(result["images_per_s"], 1), "input_workers": workers,
            "input_batch": args.input_batch}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per framework and model")
    parser.add_argument("--compile-budget", type=float, default=60.0, help="seconds per torch.compile run")
    parser.add_argument("--deadline", type=float, default=450.0,
                        help="seconds for the whole run: torch.compile runs get what is left after reserving "
                             "--reserve seconds per model still to measure (run.sh kills the run at 470 s)")
    parser.add_argument("--reserve", type=float, default=60.0, help="seconds reserved per model still to measure")
    parser.add_argument("--input-images", type=int, default=512)
    parser.add_argument("--input-seconds", type=float, default=8.0)
    parser.add_argument("--input-batch", type=int, default=256)
    parser.add_argument("--cpu-smoke", action="store_true", help="small configs, 64², batch 2, on CPU")
    parser.add_argument("--no-torch-compile", action="store_true")
    parser.add_argument("--torch-compile-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.torch_compile_worker:
        torch_compile_worker(args.torch_compile_worker, args)
        return 0
    started = time.perf_counter()
    device = jax.devices()[0]
    torch_device = "cuda" if torch.cuda.is_available() and device.platform == "gpu" else "cpu"
    torch.backends.cudnn.benchmark = True
    environment = {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                   "device": device.device_kind, "platform": device.platform, "torch_device": torch_device,
                   "cpus": os.cpu_count()}
    print(json.dumps({"environment": environment}), file=sys.stderr, flush=True)

    workers = min(os.cpu_count() or 1, 16)
    extra = input_pipeline(args, workers)
    print(json.dumps(extra), file=sys.stderr, flush=True)
    peak = matmul_peak(512 if args.cpu_smoke else 8192, 1.0 if args.cpu_smoke else 3.0)
    print(json.dumps({"bf16_matmul_peak_tflops": round(peak / 1e12, 1)}), file=sys.stderr, flush=True)

    size = 64 if args.cpu_smoke else 224
    lines = []
    out = Path(os.environ["OUT"]) / "bench_device.json" if os.environ.get("OUT") else None
    if out is not None:
        out.write_text("")

    def emit(line: dict) -> None:  # stdout and $OUT as each line is ready: a run cut short keeps what it measured
        print(json.dumps(line), flush=True)
        if out is not None:
            with open(out, "a") as handle:
                handle.write(json.dumps(line) + "\n")

    for name in args.models:
        model_started = time.perf_counter()
        model_class, config, batch = configs(args.cpu_smoke)[name]
        ours = jaxmed_step(name, model_class, config, batch, size, args.seconds)
        theirs = torch_step(ours["reference"], ours["images"], ours["labels"], args.seconds, torch_device)
        if torch_device == "cuda":
            torch.cuda.empty_cache()
        if args.no_torch_compile:
            compiled, status = None, "skipped: --no-torch-compile"
        elif args.cpu_smoke and lines:
            compiled, status = None, "skipped: --cpu-smoke compiles the first model only"
        else:
            left = args.deadline - (time.perf_counter() - started) - args.reserve * (len(args.models) - len(lines) - 1)
            compiled, status = compiled_torch(name, args, min(args.compile_budget, left))
        flops = ours["flops"]
        line = {"model": name, "jaxmed": round(ours["img_s"], 2), "reference": round(theirs, 2), "unit": "img/s",
                "ratio": round(ours["img_s"] / theirs, 3),
                "mfu": round(flops * ours["img_s"] / batch / peak, 3) if flops else None,
                "reference_mfu": round(flops * theirs / batch / peak, 3) if flops else None,
                "reference_compiled": round(compiled, 2) if compiled else None,
                "ratio_compiled": round(ours["img_s"] / compiled, 3) if compiled else None,
                "reference_compiled_status": status, "step_tflop": round(flops / 1e12, 4),
                "peak_tflops": round(peak / 1e12, 1), "batch": batch, "image_size": size, "dtype": "bfloat16",
                "jaxmed_compile_s": round(ours["compile_s"], 1), "loss": round(ours["loss"], 4),
                "kernels": ours["kernels"], "wall_s": round(time.perf_counter() - model_started, 1), **extra,
                **environment}
        line["targets"] = {"ratio_ge_1.2": line["ratio"] >= 1.2,
                           "input_ge_this_model": bool(extra.get("input_img_s")) and extra["input_img_s"] >= line["jaxmed"]}
        if name == "vit-b16" and line["mfu"] is not None:
            line["targets"]["mfu_ge_0.5"] = line["mfu"] >= 0.5
        lines.append(line)
        emit(line)
    fastest = max(line["jaxmed"] for line in lines)
    keeps_up = extra.get("input_img_s") is not None and extra["input_img_s"] >= fastest
    summary = {"summary": True, "fastest_model_img_s": fastest, "input_img_s": extra.get("input_img_s"),
               "input_keeps_up": keeps_up, "seconds": round(time.perf_counter() - started, 1)}
    emit(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
