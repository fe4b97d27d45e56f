"""Data at scale: the decoded cache of generated image folders of increasing N, the leakage step run directly on
224k synthetic pHashes and thumbnails, and 2048² JPEG decoding per core at full and reduced (DCT) scale.

Per N (4 classes of synthetic brain-MRI phantoms as JPEGs, 80/20 train/test, val carved from train, grayscale,
a 256-px train cache and 224-px ViT eval input) one JSON line: cache build time, img/s per core, peak RSS, peak and
final disk, leakage time and memory (traced allocations of the leakage step), and the time from load_dataset to
the first augmented training batch. Each N runs in a fresh process. Then one summary line:
{"exponents": {"build_time", "disk", "leakage_time", "leakage_memory"}, "peak_disk_ratio", "leakage_224k_seconds",
"leakage_224k_bytes", ...} — exponents are log-log slopes: build time and disk over the N of the builds, the
leakage step's over direct runs on 28k-224k synthetic fingerprints (in builds this small it takes milliseconds and
has not reached its chunk sizes; those slopes are reported too); the 224k build figures are extrapolations.

    python bench/data_scale.py                        # ~6 minutes on 2 busy cores
    python bench/data_scale.py --sizes 1000 4000 16000 --leakage-n 224000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np

CHEXPERT = 224_316  # images in CheXpert


def peak_rss() -> int:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent at exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def disk_bytes(folder: Path) -> int:
    total = 0
    for directory, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.stat(os.path.join(directory, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def write_folder(root: Path, count: int, size: int) -> None:
    from PIL import Image

    from jaxmed.data import synthetic
    for split, fraction in (("train", 0.8), ("test", 0.2)):
        per_class = max(2, round(count * fraction / len(synthetic.CLASS_NAMES)))
        images, labels, _ = synthetic.generate(split, per_class, size, seed=0)
        for index, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / synthetic.CLASS_NAMES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{index:06d}.jpg", quality=90)


def link_subset(pool: Path, root: Path, count: int) -> None:
    """The first count·fraction/4 files of each class of `pool` (generated once for the largest N), hard-linked."""
    for split, fraction in (("train", 0.8), ("test", 0.2)):
        for folder in sorted((pool / split).iterdir()):
            (root / split / folder.name).mkdir(parents=True)
            for path in sorted(folder.iterdir())[:max(2, round(count * fraction / 4))]:
                os.link(path, root / split / folder.name / path.name)


def one_size(count: int, pool: Path) -> dict:
    """Builds the cache of `count` images of the generated `pool` and reads the first training batch."""
    from jaxmed.data import cache, default_config, leakage, load_dataset, train_iterator
    from jaxmed.data.preprocess import Preprocessor

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        link_subset(pool, work / "data", count)
        config = default_config()
        config.update(format="imagefolder", root=str(work / "data"), cache_dir=str(work / "cache"), cache_size=256,
                      grayscale=True, val_fraction=0.2)
        preprocessor = Preprocessor(processor_type="ViTImageProcessor", size={"height": 224, "width": 224})
        import sklearn.model_selection  # noqa: F401  (imported on first use inside the build: not build time)
        measured = {}
        check, build = leakage.check, cache.build

        def timed_check(*args, **kwargs):
            tracemalloc.start()
            started = time.perf_counter()
            result = check(*args, **kwargs)
            measured["leakage_s"] = time.perf_counter() - started
            measured["leakage_bytes"] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            return result

        def timed_build(*args, **kwargs):
            started = time.perf_counter()
            build(*args, **kwargs)
            measured["build_s"] = time.perf_counter() - started
        leakage.check, cache.build = timed_check, timed_build
        peak, done = [0], threading.Event()

        def watch_disk():
            while not done.wait(0.02):
                peak[0] = max(peak[0], disk_bytes(work / "cache"))
        watcher = threading.Thread(target=watch_disk, daemon=True)
        watcher.start()
        started = time.perf_counter()
        dataset = load_dataset(config, preprocessor)
        next(train_iterator(dataset.splits["train"], preprocessor, batch_size=16, seed=0,
                            augment_settings=config.augment))
        first_batch = time.perf_counter() - started
        done.set()
        watcher.join()
        final = disk_bytes(dataset.directory)
        cores = len(os.sched_getaffinity(0))
        return {"n": count, "build_s": round(measured["build_s"], 2),
                "img_per_s_per_core": round(count / measured["build_s"] / cores, 1), "cores": cores,
                "peak_rss_bytes": peak_rss(),
                "peak_disk_bytes": max(peak[0], final), "final_disk_bytes": final,
                "leakage_s": round(measured["leakage_s"], 3), "leakage_bytes": measured["leakage_bytes"],
                "time_to_first_batch_s": round(first_batch, 2)}


def synthetic_fingerprints(count: int, group: int, planted: int, seed: int = 0):
    """pHashes in look-alike groups (members within 2 bits of their group's centre, as brain slices are), random
    thumbnails, and `planted` true near duplicates (a member's hash within 2 bits, its thumbnail plus noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.integers(0, 2**63, count // group + 1, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    phashes = centres[np.arange(count) // group]
    for _ in range(2):
        phashes ^= np.uint64(1) << rng.integers(0, 64, count).astype(np.uint64)
    phashes = phashes[rng.permutation(count)]
    thumbnails = rng.integers(0, 256, (count, 32, 32), dtype=np.uint8)
    copies, originals = rng.choice(count, (2, planted), replace=False)
    phashes[copies] = phashes[originals] ^ (np.uint64(1) << rng.integers(0, 64, planted).astype(np.uint64))
    noise = rng.integers(-3, 4, (planted, 32, 32))
    thumbnails[copies] = np.clip(thumbnails[originals].astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return phashes, thumbnails, [f"{index:032x}" for index in range(count)]


def leakage_direct(count: int, group: int) -> dict:
    """The whole leakage step (index, candidates, chunked confirmation) on `count` synthetic fingerprints."""
    from jaxmed.data import leakage

    phashes, thumbnails, pixel_hashes = synthetic_fingerprints(count, group, planted=count // 100)
    order = np.random.default_rng(1).permutation(count)
    train, val = int(0.64 * count), int(0.16 * count)
    rows = {"train": order[:train], "val": order[train:train + val], "test": order[train + val:]}
    ids = [str(index) for index in range(count)]
    tracemalloc.start()
    started = time.perf_counter()
    report, leaked = leakage.check(rows, pixel_hashes, phashes, thumbnails, ids, threshold=4)
    seconds = time.perf_counter() - started
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    inputs = phashes.nbytes + thumbnails.nbytes
    return {"leakage_n": count, "lookalike_group": group, "seconds": round(seconds, 2), "traced_bytes": traced,
            "input_bytes": inputs, "peak_rss_bytes": peak_rss(),
            "near_candidates": sum(found["near_candidates"] for found in report["pairs"].values()),
            "near_pairs": sum(found["near"] for found in report["pairs"].values()),
            "train_images_duplicating_val_or_test": int(len(leaked))}


def jpeg_decode(images: int, side: int = 2048, cache_side: int = 256) -> dict:
    """img/s on this one core decoding 2048² JPEGs and squashing them to the 256-px train cache, full vs reduced."""
    from PIL import Image

    from jaxmed.data import decode, synthetic
    with tempfile.TemporaryDirectory() as work:
        base, _, _ = synthetic.generate("train", 1, 512, seed=0)
        paths = []
        for index in range(images):
            path = Path(work) / f"{index}.jpg"
            Image.fromarray(base[index % len(base)]).resize((side, side), Image.Resampling.BICUBIC).save(path,
                                                                                                          quality=90)
            paths.append(path)
        rates = {}
        for name, reduce_to in (("full", 0), ("reduced", cache_side)):
            started = time.perf_counter()
            for path in paths:
                with decode.reduced_scale(reduce_to):
                    image = decode.clean(decode.open_image(path), grayscale=True)
                image.resize((cache_side, cache_side), Image.Resampling.BILINEAR)
            rates[name] = round(images / (time.perf_counter() - started), 1)
        return {"jpeg_side": side, "img_per_s_per_core": rates}


def run_child(arguments: list[str], pin: bool = False) -> dict:
    command = [sys.executable, __file__, *arguments]
    preexec = (lambda: os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})) if pin else None
    result = subprocess.run(command, capture_output=True, text=True, preexec_fn=preexec, check=False)
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def slope(xs, ys) -> float:
    return round(float(np.polyfit(np.log(xs), np.log(np.maximum(ys, 1e-9)), 1)[0]), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 1000, 2000, 4000])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--leakage-n", type=int, default=CHEXPERT)
    parser.add_argument("--lookalike-group", type=int, default=16, help="images per look-alike pHash group")
    parser.add_argument("--jpeg-images", type=int, default=16)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pool", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--leakage", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--jpeg", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_size(args.one, args.pool)))
        return
    if args.leakage:
        print(json.dumps(leakage_direct(args.leakage, args.lookalike_group)))
        return
    if args.jpeg:
        print(json.dumps(jpeg_decode(args.jpeg)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as pool:
        write_folder(Path(pool), max(args.sizes), args.image_size)  # generated once; each N links a subset
        for count in sorted(args.sizes):
            rows.append(run_child(["--one", str(count), "--pool", pool]) | {"image_size": args.image_size})
            print(json.dumps(rows[-1]), flush=True)
    series = []
    for count in [args.leakage_n // 8, args.leakage_n // 4, args.leakage_n // 2, args.leakage_n]:
        series.append(run_child(["--leakage", str(count), "--lookalike-group", str(args.lookalike_group)]))
        print(json.dumps(series[-1]), flush=True)
    direct = series[-1]
    jpeg = run_child(["--jpeg", str(args.jpeg_images)], pin=True)
    print(json.dumps(jpeg), flush=True)
    sizes = [row["n"] for row in rows]
    counts = [run["leakage_n"] for run in series]  # the leakage step's scaling, where it matters: 28k-224k
    exponents = {"build_time": slope(sizes, [row["build_s"] for row in rows]),
                 "disk": slope(sizes, [row["final_disk_bytes"] for row in rows]),
                 "leakage_time": slope(counts, [run["seconds"] for run in series]),
                 "leakage_memory": slope(counts, [run["traced_bytes"] for run in series])}
    in_builds = {"leakage_time": slope(sizes, [row["leakage_s"] for row in rows]),
                 "leakage_memory": slope(sizes, [row["leakage_bytes"] for row in rows])}
    last = rows[-1]
    scale = CHEXPERT / last["n"]
    print(json.dumps({
        "exponents": exponents, "leakage_exponents_in_builds": in_builds,
        "peak_disk_ratio": round(max(row["peak_disk_bytes"] / row["final_disk_bytes"] for row in rows), 3),
        "leakage_224k_seconds": direct["seconds"], "leakage_224k_bytes": direct["traced_bytes"],
        "leakage_224k_peak_rss_bytes": direct["peak_rss_bytes"],
        "extrapolated_224k_build_s": round(last["build_s"] * scale ** exponents["build_time"]),
        "extrapolated_224k_final_disk_bytes": round(last["final_disk_bytes"] * scale),
        "jpeg_2048_img_per_s_per_core": jpeg["img_per_s_per_core"]}))


if __name__ == "__main__":
    main()
