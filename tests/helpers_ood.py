"""Images a brain-MRI phantom model has not seen: fresh phantoms (a seed no run uses) and non-MRI images made here
without the phantom generator — handwritten digits, noise, rendered text, a CT slice, photographs, flat and drawn
shapes — written as PNG files into DIR/<kind>/, for the OOD tests and the README's worked example."""

from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw

NON_MRI_KINDS = ("digits", "noise", "text", "ct", "photo", "shapes")


def write_mixed_folder(root: Path, per_kind: int = 20, size: int = 96, seed: int = 2026) -> dict[str, list[Path]]:
    """{kind: files}: "phantoms" (unseen brain-MRI phantoms) and the NON_MRI_KINDS."""
    from jaxmed.data import synthetic

    rng = np.random.default_rng(seed)
    phantoms, _, _ = synthetic.generate("test", max(1, per_kind // 4), size, seed=seed)
    made = {"phantoms": list(phantoms), **{kind: [] for kind in NON_MRI_KINDS}}
    digits = _digits()
    photos = _photos()
    ct = _ct_slice()
    for index in range(per_kind):
        made["digits"].append(cv2.resize(digits[index % len(digits)], (size, size), interpolation=cv2.INTER_CUBIC))
        noise = rng.integers(0, 256, (size, size), dtype=np.uint8)
        made["noise"].append(cv2.GaussianBlur(noise, (0, 0), 1 + index % 3) if index % 2 else noise)
        made["text"].append(_text(rng, size))
        crop = ct[rng.integers(0, ct.shape[0] // 3):][:, rng.integers(0, ct.shape[1] // 3):]
        made["ct"].append(cv2.resize(crop if index else ct, (size, size), interpolation=cv2.INTER_AREA))
        photo = photos[index % len(photos)]
        top, left = rng.integers(0, photo.shape[0] - 200), rng.integers(0, photo.shape[1] - 200)
        made["photo"].append(cv2.resize(photo[top:top + 200, left:left + 200], (size, size)))
        made["shapes"].append(_shapes(rng, size, flat=index % 3 == 0))
    files = {}
    for kind, images in made.items():
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        files[kind] = []
        for index, image in enumerate(images[:per_kind]):
            files[kind].append(folder / f"{kind}_{index:03d}.png")
            Image.fromarray(image).save(files[kind][-1])
    return files


def _digits() -> list[np.ndarray]:
    from sklearn.datasets import load_digits

    return [(image * 255 / 16).astype(np.uint8) for image in load_digits().images[:200]]


def _photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return list(load_sample_images().images)  # a temple in China and a flower, 427×640 RGB


def _ct_slice() -> np.ndarray:
    import pydicom
    from pydicom.data import get_testdata_file

    pixels = pydicom.dcmread(get_testdata_file("CT_small.dcm")).pixel_array.astype(np.float64)
    return ((pixels - pixels.min()) / np.ptp(pixels) * 255).astype(np.uint8)


def _text(rng, size: int) -> np.ndarray:
    background = int(rng.integers(0, 2)) * 255
    picture = Image.new("L", (size, size), background)
    draw = ImageDraw.Draw(picture)
    words = ["patient", "report", "left", "scan", "MRI", "2026", "dose", "the", "image", "normal"]
    for line in range(int(rng.integers(3, 7))):
        text = " ".join(rng.choice(words, 3))
        draw.text((int(rng.integers(0, 10)), 4 + line * 14), text, fill=255 - background)
    return np.asarray(picture)


def _shapes(rng, size: int, flat: bool) -> np.ndarray:
    picture = Image.new("L", (size, size), int(rng.integers(0, 256)))
    if not flat:
        draw = ImageDraw.Draw(picture)
        for _ in range(int(rng.integers(1, 4))):
            box = sorted(rng.integers(0, size, 2)), sorted(rng.integers(0, size, 2))
            shape = draw.ellipse if rng.integers(0, 2) else draw.rectangle
            shape([box[0][0], box[1][0], box[0][1], box[1][1]], fill=int(rng.integers(0, 256)))
    return np.asarray(picture)


def flag_rates(workdir, folder) -> dict[str, dict[str, float]]:
    """{detector: {kind: share flagged}} of `folder`'s kinds (its subfolders), each detector at its own val
    threshold from the run's W/ood: the README's table."""
    from jaxmed import predict
    from jaxmed.evaluate import ood

    predictor = predict.load_predictor(workdir=workdir)
    files, _, _ = predict.collect_inputs([str(folder)])
    kinds = np.array([Path(path).parent.name for path in files])
    rates = {}
    for method in ood.DETECTORS:
        predictor.ood.method = method
        flags = predict.predict_files(predictor, files).out_of_distribution
        rates[method] = {kind: float(np.mean(flags[kinds == kind])) for kind in dict.fromkeys(kinds)}
    return rates


if __name__ == "__main__":  # python tests/helpers_ood.py DIR [PER_KIND] [WORKDIR]: write DIR; with WORKDIR, the table
    import sys

    write_mixed_folder(Path(sys.argv[1]), per_kind=int(sys.argv[2]) if len(sys.argv) > 2 else 40)
    if len(sys.argv) > 3:
        table = flag_rates(sys.argv[3], sys.argv[1])
        print("| detector | " + " | ".join(next(iter(table.values()))) + " |")
        for method, row in table.items():
            print(f"| {method} | " + " | ".join(f"{rate:.3f}" for rate in row.values()) + " |")
