"""Input-pipeline throughput: jaxmed (decoded cache → grain → one fused warp, normalised by a jitted step) vs
the reference notebooks' torchvision chain (decode JPEG → Resize 224 → RandomRotation 15 → RandomResizedCrop .8–1 →
flips → ColorJitter .2/.2 → float CHW → Normalize), on the same generated 512×512 JPEGs, same run.

torchvision does not import beside torch 2.13, so the reference chain is rebuilt from the PIL calls torchvision's
PIL path makes (nearest-neighbour rotation, crop-then-bilinear resize, ImageEnhance blends in random order).
Each "per core" number comes from a subprocess pinned to one core before any thread exists; the scaling runs
use every core. The last line is one JSON object.

    python bench/input_pipeline.py                 # ~1.5 minutes on 2 cores
    python bench/input_pipeline.py --images 1000 --seconds 20
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CLASSES = ("glioma", "meningioma", "no_tumor", "pituitary")
VIT_CONFIG = {"image_processor_type": "ViTImageProcessor", "size": {"height": 224, "width": 224}, "resample": 2,
              "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400, help="512×512 JPEGs to generate")
    parser.add_argument("--seconds", type=float, default=6.0, help="measuring time per configuration")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workdir", default="", help="keep the JPEGs and cache here (default: a temp dir)")
    parser.add_argument("--mode", choices=["jaxmed", "reference"], help=argparse.SUPPRESS)  # subprocess role
    parser.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        measure = measure_jaxmed if args.mode == "jaxmed" else measure_reference
        print(json.dumps(measure(Path(args.workdir), args)))
        return

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="jaxmed-bench-"))
    cores = sorted(os.sched_getaffinity(0))
    started = time.perf_counter()
    generate_jpegs(workdir / "jpegs", args.images)
    print(f"generated {args.images} 512×512 JPEGs in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    cache = build_cache(workdir)
    print(f"cache build: {cache['images_per_s']:.0f} img/s on {len(cores)} cores", file=sys.stderr)

    def run(mode, pinned, workers=0):
        command = [sys.executable, __file__, "--mode", mode, "--workdir", str(workdir), "--workers", str(workers),
                   "--seconds", str(args.seconds), "--batch", str(args.batch)]
        pin = (lambda: os.sched_setaffinity(0, {cores[0]})) if pinned else None
        process = subprocess.run(command, preexec_fn=pin, capture_output=True, text=True)
        if process.returncode:
            sys.exit(f"{mode} measurement failed:\n{process.stderr}")
        result = json.loads(process.stdout.strip().splitlines()[-1])
        print(f"{mode:9s} {'1 core' if pinned else f'{len(cores)} cores, {workers} workers':22s} "
              f"{result['images_per_s']:8.0f} img/s", file=sys.stderr)
        return result["images_per_s"]

    jaxmed, reference = run("jaxmed", pinned=True), run("reference", pinned=True)
    scaling = {f"workers_{workers}": round(run("jaxmed", pinned=False, workers=workers), 1)
               for workers in sorted({0, 1, len(cores)})}
    print(json.dumps({"jaxmed": round(jaxmed, 1), "reference": round(reference, 1), "unit": "images/s/core",
                      "ratio": round(jaxmed / reference, 2), "jaxmed_all_cores": scaling, "cores": len(cores),
                      "cache_build_images_per_s": round(cache["images_per_s"], 1),
                      "cache_build_images_per_s_per_core": round(cache["images_per_s"] / len(cores), 1),
                      "images": args.images, "batch": args.batch, "output": "224x224 ViT input"}))


def generate_jpegs(folder: Path, count: int) -> None:
    """Synthetic MRI phantoms upscaled to 512×512 with fine noise: JPEGs of realistic size and decode cost."""
    import cv2
    from jaxmed.data import synthetic

    per_class = math.ceil(count / len(CLASSES))
    images, labels, _ = synthetic.generate("train", per_class, 128, seed=0)
    rng = np.random.default_rng(0)
    for index in range(count):
        large = cv2.resize(images[index], (512, 512), interpolation=cv2.INTER_CUBIC).astype(np.float32)
        large = np.clip(large + rng.normal(0, 3, large.shape), 0, 255).astype(np.uint8)
        path = folder / ("test" if index % 5 == 0 else "train") / CLASSES[labels[index]] / f"{index:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), cv2.cvtColor(large, cv2.COLOR_GRAY2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])


def data_config(workdir: Path):
    from jaxmed.data import default_config
    config = default_config()
    config.update(format="imagefolder", root=str(workdir / "jpegs"), cache_dir=str(workdir / "cache"),
                  val_fraction=0.0, near_duplicate_threshold=-1)
    return config


def build_cache(workdir: Path) -> dict:
    from jaxmed.data import Preprocessor, load_dataset
    started = time.perf_counter()
    dataset = load_dataset(data_config(workdir), Preprocessor.from_config(VIT_CONFIG))
    count = sum(len(split) for split in dataset.splits.values())
    return {"images_per_s": count / (time.perf_counter() - started)}


def measure_jaxmed(workdir: Path, args) -> dict:
    """Augmented, model-ready batches: grain iterator → uint8 batch → jitted normalisation to float32."""
    import jax
    from jaxmed.data import Preprocessor, load_dataset, model_inputs, train_iterator

    preprocessor = Preprocessor.from_config(VIT_CONFIG)
    config = data_config(workdir)
    split = load_dataset(config, preprocessor).splits["train"]
    pinned = len(os.sched_getaffinity(0)) == 1
    iterator = train_iterator(split, preprocessor, batch_size=args.batch, seed=0, augment_settings=config.augment,
                              num_workers=args.workers, read_threads=1 if pinned else None)
    normalise = jax.jit(lambda images: model_inputs(images, preprocessor))
    return _time_batches(lambda: normalise(next(iterator)["image"]).block_until_ready(), args)


def measure_reference(workdir: Path, args) -> dict:
    from PIL import Image
    paths = sorted((workdir / "jpegs" / "train").rglob("*.jpg"))
    rng = np.random.default_rng(0)
    position = [0]

    def batch():
        tensors = []
        for _ in range(args.batch):
            tensors.append(reference_transform(Image.open(paths[position[0] % len(paths)]), rng))
            position[0] += 1
        return np.stack(tensors)  # the DataLoader's collate
    return _time_batches(batch, args)


def reference_transform(image, rng: np.random.Generator) -> np.ndarray:
    """The reference's torchvision transforms, as torchvision's PIL path executes them."""
    from PIL import Image, ImageEnhance

    image = image.convert("RGB")
    width, height = image.size  # Resize(224): shorter side to 224, bilinear with antialias
    scale = 224 / min(width, height)
    image = image.resize((round(width * scale), round(height * scale)), Image.Resampling.BILINEAR)
    image = image.rotate(rng.uniform(-15, 15), resample=Image.Resampling.NEAREST, expand=False, fillcolor=0)
    left, top, crop_width, crop_height = _torchvision_crop_box(rng, image.height, image.width)
    image = image.crop((left, top, left + crop_width, top + crop_height)).resize((224, 224),
                                                                                Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    enhancers = [(ImageEnhance.Brightness, rng.uniform(0.8, 1.2)), (ImageEnhance.Contrast, rng.uniform(0.8, 1.2))]
    for index in rng.permutation(2):
        enhancer, factor = enhancers[index]
        image = enhancer(image).enhance(factor)
    pixels = np.asarray(image, np.float32).transpose(2, 0, 1) / 255  # ToTensor: float CHW in [0, 1]
    return (pixels - 0.5) / 0.5  # Normalize(mean=0.5, std=0.5), the ViT processor's


def _torchvision_crop_box(rng, height, width):
    from jaxmed.data import augment  # the same sampling as torchvision's RandomResizedCrop.get_params
    box = augment.resized_crop_boxes(rng, np.array([height]), np.array([width]), (0.8, 1.0), (3 / 4, 4 / 3))[0]
    return tuple(int(value) for value in box)


def _time_batches(next_batch, args) -> dict:
    for _ in range(2):  # warm-up: worker start, jit compilation, page cache
        next_batch()
    started, batches = time.perf_counter(), 0
    while time.perf_counter() - started < args.seconds:
        next_batch()
        batches += 1
    elapsed = time.perf_counter() - started
    return {"images_per_s": batches * args.batch / elapsed}


if __name__ == "__main__":
    main()
