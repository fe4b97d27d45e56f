"""Offline demo of the HF ⇄ jaxmed round trip: HF PyTorch model → jaxmed → logits parity → HF directory again.

    python -m jaxmed.demo [--workdir runs/hf_roundtrip]

Needs no hub and no GPU: it builds random-init HF models (the same files a hub download gives) in the workdir.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from jaxmed.convert import TABLES  # noqa: E402
from jaxmed.data.preprocess import Preprocessor  # noqa: E402
from jaxmed.errors import JaxmedError  # noqa: E402
from jaxmed.convert import from_pretrained, save_pretrained  # noqa: E402

LABELS = {0: "glioma", 1: "meningioma", 2: "no_tumor", 3: "pituitary"}


def _models():
    small_vit = transformers.ViTConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=3,
                                       intermediate_size=768, image_size=224, patch_size=16, num_labels=1000)
    return {
        "vit-small-random": transformers.ViTForImageClassification(small_vit),
        "resnet-50-random": transformers.ResNetForImageClassification(transformers.ResNetConfig()),
    }


def _phantom(size: int = 512) -> np.ndarray:
    """A head-like ellipse with a bright round lesion, as a uint8 RGB image."""
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    head = ((xx / 0.4) ** 2 + (yy / 0.45) ** 2 < 1) * 0.6
    lesion = ((xx - 0.12) ** 2 + (yy + 0.1) ** 2 < 0.004) * 0.4
    gray = np.clip((head + lesion) * 255 + np.random.RandomState(0).randn(size, size) * 8, 0, 255)
    return np.repeat(gray.astype(np.uint8)[..., None], 3, axis=2)


def run(workdir: Path) -> dict:
    torch.manual_seed(0)
    results = {}
    for name, reference in _models().items():
        reference.eval()
        hf_dir = workdir / name
        reference.save_pretrained(str(hf_dir))
        # the real checkpoints' processors: ViT resizes to 224² with mean=std=0.5, ResNet crops at 0.875
        table = "vit" if "vit" in name else "resnet"
        (hf_dir / "preprocessor_config.json").write_text(json.dumps(TABLES[table][1]))
        start = time.perf_counter()
        model = from_pretrained(hf_dir)
        load_s = time.perf_counter() - start
        pixels = Preprocessor.from_pretrained(hf_dir)(_phantom())[None]
        with torch.no_grad():
            expected = reference(torch.from_numpy(pixels.transpose(0, 3, 1, 2))).logits.numpy()
        got = np.asarray(model(pixels))
        tumour_model = from_pretrained(hf_dir, num_labels=4, id2label=LABELS)
        export_dir = save_pretrained(tumour_model, workdir / f"{name}-4-classes")
        reopened = transformers.AutoModelForImageClassification.from_pretrained(str(export_dir)).eval()
        with torch.no_grad():
            reopened_logits = reopened(torch.from_numpy(pixels.transpose(0, 3, 1, 2))).logits.numpy()
        results[name] = {
            "load_seconds": round(load_s, 2),
            "max_abs_logit_diff_vs_pytorch": float(np.abs(got - expected).max()),
            "export": str(export_dir),
            "export_max_abs_logit_diff": float(np.abs(np.asarray(tumour_model(pixels)) - reopened_logits).max()),
            "labels": list(reopened.config.id2label.values()),
        }
    return results


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # not runs/demo: that is the training demo's run (make demo), which ~200 MB of random models would clutter
    result.add_argument("--workdir", type=Path, default=Path("runs/hf_roundtrip"),
                        help="where the random-init HF models and their exports go (default runs/hf_roundtrip)")
    return result


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        results = run(args.workdir)
    except JaxmedError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for name, result in results.items():
        print(f"{name}: |jaxmed - PyTorch| max {result['max_abs_logit_diff_vs_pytorch']:.2e}; "
              f"exported with labels {result['labels']} to {result['export']} "
              f"(transformers reopens it, max diff {result['export_max_abs_logit_diff']:.2e})")
    (args.workdir / "demo.json").write_text(json.dumps(results, indent=2))
    ok = all(r["max_abs_logit_diff_vs_pytorch"] <= 1e-4 and r["export_max_abs_logit_diff"] <= 1e-4
             for r in results.values())
    print(json.dumps({"demo": "conversion", "parity_ok": ok, "workdir": str(args.workdir)}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
