"""Classify new images with a trained run or an exported model: the run's own evaluation preprocessing, one CSV row
per image, unreadable files listed with the reason, and optional Grad-CAM / attention-rollout overlays.

    python -m jaxmed.predict (--workdir W [--checkpoint best|latest|STEP] | --model HF_DIR) INPUT... --out DIR
                             [--explain N] [--strict] [--batch-size B] [--color]

DIR gets predictions.csv (path, prediction, p_<class>…, flagged when the run has an operating point, temperature),
skipped.csv (path, reason), summary.json and explain/. Probabilities are softmax(logits / T) with T from
calibration.json next to the model ({"temperature": T}; else T = 1), and rows are flagged when
p_<positive_class> >= threshold from operating_point.json ({"positive_class": name, "threshold": t}); evaluation
writes both for the checkpoint it evaluated, and a file naming another checkpoint is not applied (summary: notes).
jaxmed.export copies both into HF_DIR with jaxmed_input.json (the run's data.grayscale and data.dicom_frame), so
--model predicts as --workdir does.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import io
import json
import logging
import math
import os
import re
import sys
from pathlib import Path

import numpy as np

from jaxmed.cli import OneLineParser, run_command
from jaxmed.data import decode
from jaxmed.errors import JaxmedError

log = logging.getLogger("jaxmed.predict")
PROGRESS_ABOVE = 200  # images; fewer finish before a progress bar would say anything
DEFAULT_BATCH_SIZE = 64


@dataclasses.dataclass
class Predictor:
    """A model in eval mode and everything that turns a file into its input, read from the run or the HF dir."""
    model: object
    class_names: list[str]
    preprocessor: object  # jaxmed.data.preprocess.Preprocessor
    grayscale: bool
    dicom_frame: int
    temperature: float
    calibrated: bool  # a calibration.json supplied the temperature
    operating_point: dict | None
    origin: dict  # {"checkpoint": "W … best/8"} or {"model": HF_DIR}, for the summary
    batch_size: int
    notes: list[str]  # what the summary should tell: files next to the model that were not applied


def load_predictor(*, workdir=None, model_dir=None, checkpoint: str = "best", color: bool = False,
                   batch_size: int | None = None) -> Predictor:
    from jaxmed.convert import hub
    from jaxmed.data import cache
    from jaxmed.data.preprocess import Preprocessor

    if workdir is not None:
        from jaxmed import export
        from jaxmed.config import load_run_config
        from jaxmed.train.checkpoint import workdir_path
        import jax.numpy as jnp

        directory = workdir_path(workdir)
        config = load_run_config(directory)  # "no config.json …: is this a jaxmed run directory?"
        stored = _stored_with(directory)
        model, source = export.load_trained(directory, checkpoint, dtype=jnp.dtype(config.model.dtype))
        grayscale, frame = bool(config.data.grayscale), int(config.data.get("dicom_frame", -1))
        origin, batch_size = {"checkpoint": f"{directory} {source}"}, batch_size or config.train.eval_batch_size
    else:
        directory = Path(model_dir).expanduser()
        if not directory.is_dir():  # hub.resolve would try the internet for a name that looks like a hub id
            raise JaxmedError(f"--model {model_dir}: no such directory; pass a folder written by "
                              "`python -m jaxmed.export --workdir W --out DIR`")
        stored = _stored_with(directory)
        model, source = hub.from_pretrained(directory), None
        grayscale, frame = _exported_input(directory, color)
        origin = {"model": str(directory)}
    names = [model.config.id2label[index] for index in range(model.config.num_labels)]
    preprocessor = Preprocessor.from_config(hub.preprocessor_config(model))
    cache.eval_size(preprocessor)  # batching needs one input size: fail now, not after decoding
    notes = []
    for index, (name, value) in enumerate(zip(("calibration.json", "operating_point.json"), stored)):
        # Evaluation writes both for the checkpoint it evaluated; another checkpoint's logits are not theirs.
        fitted_for = (value or {}).get("checkpoint")
        if source is not None and fitted_for is not None and fitted_for != source:
            notes.append(f"{name} is for {fitted_for}, not {source}: not applied")
            log.warning("%s", notes[-1])
            stored[index] = None
    temperature = _temperature(stored[0], directory / "calibration.json")
    return Predictor(model, names, preprocessor, grayscale, frame, temperature, stored[0] is not None,
                     _operating_point(stored[1], directory / "operating_point.json", names), origin,
                     batch_size or DEFAULT_BATCH_SIZE, notes)


def _exported_input(directory: Path, color: bool) -> tuple[bool, int]:
    """(grayscale, dicom_frame) from the jaxmed_input.json jaxmed.export writes; without one (a plain HF directory)
    images are converted to gray unless `color`."""
    from jaxmed.export import INPUT_FILE

    stored = _read_json(directory / INPUT_FILE)
    if stored is None:
        return not color, -1
    grayscale, frame = stored.get("grayscale"), stored.get("dicom_frame", -1)
    if not isinstance(grayscale, bool) or isinstance(frame, bool) or not isinstance(frame, int):
        raise JaxmedError(f"{directory / INPUT_FILE}: grayscale must be true/false and dicom_frame an integer")
    if color and grayscale:
        raise JaxmedError(f"--color: {directory / INPUT_FILE} says the model was trained on grayscale images")
    return grayscale, frame


def _stored_with(directory) -> list:
    """calibration.json and operating_point.json (None where absent); a bad temperature fails before loading."""
    stored = [_read_json(directory / name) for name in ("calibration.json", "operating_point.json")]
    _temperature(stored[0], directory / "calibration.json")
    return stored


def _read_json(path) -> dict | None:
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise JaxmedError(f"cannot read {path}: {error}") from None
    if not isinstance(value, dict):
        raise JaxmedError(f"{path} must hold a JSON object")
    return value


def _temperature(value: dict | None, path) -> float:
    if value is None:
        return 1.0
    return _number(value.get("temperature"), path, "temperature", "a positive number", lambda t: t > 0)


def _operating_point(value: dict | None, path, names: list[str]) -> dict | None:
    if value is None:
        return None
    if value.get("positive_class") not in names:
        raise JaxmedError(f"{path}: positive_class {value.get('positive_class')!r} is not one of the model's "
                          f"classes {names}")
    threshold = _number(value.get("threshold"), path, "threshold", "a probability in [0, 1]", lambda t: 0 <= t <= 1)
    return {"positive_class": value["positive_class"], "threshold": threshold}


def _number(value, path, key: str, expected: str, valid) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not valid(value):
        raise JaxmedError(f"{path}: {key} must be {expected}; got {value!r}")
    return float(value)


def collect_inputs(inputs) -> tuple[list[Path], list[tuple[str, str]], int]:
    """(files to decode, (path, reason) of inputs that cannot be, count of non-image files ignored in folders).

    Folders: recursively, sorted as the imagefolder source walks them, junk skipped, image names and DICOM files
    kept. A file named explicitly is always tried — the person asked for it — so a text file ends up in skipped.csv
    with the decoder's reason, not silently dropped."""
    files, skipped, ignored, seen = [], [], 0, set()
    for given in inputs:
        path = Path(given).expanduser()
        if path.is_dir():
            found = []
            for directory, subdirectories, names in os.walk(path):
                subdirectories[:] = sorted(name for name in subdirectories if not decode.is_junk(name))
                for name in sorted(names):
                    candidate = Path(directory) / name
                    if decode.is_image_file(candidate):
                        found.append(candidate)
                    elif not decode.is_junk(name):
                        ignored += 1
        elif path.exists():
            found = [path]
        else:
            skipped.append((str(path), "no such file or directory"))
            continue
        for candidate in found:
            key = os.path.realpath(candidate)
            if key not in seen:  # a file inside a folder that was also given
                seen.add(key)
                files.append(candidate)
    return files, skipped, ignored


def _decoder(predictor: Predictor):
    """path → (uint8 model-size image, None) or (None, reason): cache.py's eval decoding, file by file."""
    def work(path):
        try:
            image = decode.clean(decode.open_image(path, dicom_frame=predictor.dicom_frame),
                                 grayscale=predictor.grayscale)
            return predictor.preprocessor.geometry(image), None  # "L" becomes RGB here, as in the cache
        except Exception as error:  # any file problem is that file's, never the batch's
            return None, str(error) if isinstance(error, decode.UnreadableImage) else f"{type(error).__name__}: {error}"
    return work


def _decoded(files, work, chunk: int):
    """(path, image, reason) in input order; the next chunk decodes in threads while this one is on the device."""
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # PIL releases the GIL
        pending = [pool.submit(work, path) for path in files[:chunk]]
        for start in range(0, len(files), chunk):
            ahead = [pool.submit(work, path) for path in files[start + chunk:start + 2 * chunk]]
            for path, future in zip(files[start:start + chunk], pending):
                yield (path, *future.result())
            pending = ahead


def _forward(predictor: Predictor):
    """A jitted uint8 batch → float32 logits (normalisation on the device, as in training), data-sharded over
    every device when the batch divides evenly, else on the first device; the weights are placed once."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxmed.train import mesh as jmesh

    graphdef, state = nnx.split(predictor.model)
    devices = jax.device_count() if predictor.batch_size % jax.device_count() == 0 else 1
    mesh = jmesh.make_mesh(data=devices)
    batch, replicated = jmesh.batch_sharding(mesh), jmesh.replicated(mesh)
    state = jax.device_put(state, replicated)

    def logits(state, images):
        model = nnx.merge(graphdef, state)
        return model(predictor.preprocessor.normalize(images)).astype(jnp.float32)

    step = jax.jit(logits, in_shardings=(replicated, batch), out_shardings=replicated)
    log.info("batches of %d on %d of %d devices", predictor.batch_size, devices, jax.device_count())
    return lambda images: np.asarray(step(state, jax.device_put(images, batch)))


@dataclasses.dataclass
class Predictions:
    paths: list[str]
    logits: np.ndarray  # (N, classes) float32
    probabilities: np.ndarray  # (N, classes) float64, softmax(logits / temperature)
    flagged: np.ndarray | None  # (N,) bool at the operating point, or None without one
    skipped: list[tuple[str, str]]
    images: np.ndarray  # uint8 model-size images of the first `keep_images` rows (for --explain)


def predict_files(predictor: Predictor, files, *, skipped=(), strict: bool = False, keep_images: int = 0):
    from scipy.special import softmax
    from tqdm import tqdm

    size = predictor.batch_size
    skipped, paths, logits, kept = list(skipped), [], [], []
    forward, batch, batch_paths = _forward(predictor), [], []

    def flush():
        count = len(batch)
        padded = np.stack(batch + [np.zeros_like(batch[0])] * (size - count))  # one shape: one compilation
        logits.append(forward(padded)[:count])
        paths.extend(batch_paths)
        batch.clear(), batch_paths.clear()

    with tqdm(total=len(files), unit="img", desc="predicting", mininterval=1.0,
              disable=len(files) <= PROGRESS_ABOVE) as progress:
        for path, image, reason in _decoded(files, _decoder(predictor), chunk=size * 4):
            progress.update()
            if image is None:
                skipped.append((str(path), reason))
                if strict:
                    raise JaxmedError(_unreadable_message(skipped))
                continue
            if len(paths) + len(batch) < keep_images:
                kept.append(image)
            batch.append(image), batch_paths.append(str(path))
            if len(batch) == size:
                flush()
        if batch:
            flush()
    classes = len(predictor.class_names)
    logits = np.concatenate(logits) if logits else np.zeros((0, classes), np.float32)
    probabilities = softmax(logits.astype(np.float64) / predictor.temperature, axis=-1)
    flagged = None
    if predictor.operating_point is not None:
        positive = predictor.class_names.index(predictor.operating_point["positive_class"])
        flagged = probabilities[:, positive] >= predictor.operating_point["threshold"]
    images = np.stack(kept) if kept else np.zeros((0, 1, 1, 3), np.uint8)
    return Predictions(paths, logits, probabilities, flagged, skipped, images)


def _unreadable_message(skipped) -> str:
    listing = "; ".join(f"{path} ({reason})" for path, reason in skipped[:3])
    more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    return f"--strict: unreadable input {listing}{more}"


def write_outputs(out: Path, predictor: Predictor, result: Predictions, ignored: int) -> dict:
    """predictions.csv and skipped.csv; returns the summary (the caller adds to it and writes summary.json)."""
    out.mkdir(parents=True, exist_ok=True)
    names, flagged = predictor.class_names, result.flagged
    header = ["path", "prediction", *(f"p_{name}" for name in names), *(["flagged"] if flagged is not None else []),
              "temperature"]
    rows = [[path, names[int(np.argmax(row))], *(repr(float(p)) for p in row),  # report.write_predictions' format
             *([bool(flagged[index])] if flagged is not None else []), f"{predictor.temperature:g}"]
            for index, (path, row) in enumerate(zip(result.paths, result.probabilities))]
    _write_csv(out / "predictions.csv", header, rows)
    _write_csv(out / "skipped.csv", ["path", "reason"], result.skipped)
    summary = {"predicted": len(result.paths), "skipped": len(result.skipped), "ignored_non_images": ignored,
               "temperature": predictor.temperature,
               "probabilities": ("softmax(logits / temperature), temperature from calibration.json"
                                 if predictor.calibrated else "softmax(logits), uncalibrated"),
               **predictor.origin, "class_names": names, "out": str(out)}
    if result.flagged is not None:
        summary.update(operating_point=predictor.operating_point, flagged=int(result.flagged.sum()))
    if predictor.notes:
        summary["notes"] = predictor.notes
    return summary


def _write_csv(path: Path, header, rows) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    path.write_text(buffer.getvalue())


def explain(predictor: Predictor, result: Predictions, out_dir: Path) -> list[Path]:
    """One overlay PNG per kept image: attention rollout for ViT, Grad-CAM of the predicted class otherwise."""
    from jaxmed.evaluate import explain as explainers
    from jaxmed.evaluate.figures import overlay
    from jaxmed.models import ViT

    model, count = predictor.model, len(result.images)
    if not count:
        return []
    if predictor.model.config.model_type not in explainers.EXPLAINED:
        log.warning("--explain: no heatmaps for a %s model", model.config.model_type)
        return []
    pixels = np.asarray(predictor.preprocessor.normalize(result.images))
    if isinstance(model, ViT):
        method, maps = "attention_rollout", explainers.attention_rollout(model, pixels)
    else:
        method, maps = "gradcam", explainers.grad_cam(model, pixels)
    written = []
    for index in range(count):
        probabilities, name = result.probabilities[index], Path(result.paths[index]).name
        predicted = int(np.argmax(probabilities))
        title = f"{name[:28]}\n{predictor.class_names[predicted]} ({probabilities[predicted]:.2f})"
        stem = re.sub(r"[^\w.-]+", "_", Path(name).stem)[:60]
        written.append(out_dir / f"{index:04d}_{stem}_{method}.png")
        overlay(result.images[index:index + 1], maps[index:index + 1], [title], written[-1])
    return written


def main(argv=None) -> int:
    purpose, usage, outputs = __doc__.split("\n\n")[:3]
    parser = OneLineParser(prog="python -m jaxmed.predict", usage=" ".join(usage.split()),
                     description=f"{purpose}\n\n{outputs}", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="image files, DICOM files or folders (recursive)")
    parser.add_argument("--workdir", metavar="W", help="a run directory trained by jaxmed.main")
    parser.add_argument("--checkpoint", metavar="WHICH", help="with --workdir: best (default), latest or a step")
    parser.add_argument("--model", metavar="HF_DIR", help="instead of --workdir: a directory jaxmed.export wrote")
    parser.add_argument("--color", action="store_true",
                        help="with --model on a directory without jaxmed_input.json (not written by jaxmed.export): "
                             "keep colour; such a directory does not say, so images are converted to gray")
    parser.add_argument("--out", required=True, metavar="DIR", help="where the outputs go (created)")
    parser.add_argument("--explain", type=int, default=0, metavar="N", help="overlays of the first N readable images "
                        "in DIR/explain/: attention rollout (ViT), Grad-CAM of the predicted class (the others)")
    parser.add_argument("--strict", action="store_true", help="any unreadable input is an error (exit 2)")
    parser.add_argument("--batch-size", type=int, default=0, metavar="B",
                        help="images per device step; default: the run's train.eval_batch_size, else 64")
    return run_command(parser, argv, run)


def run(args) -> dict:
    if (args.workdir is None) == (args.model is None):
        raise JaxmedError("pass exactly one of --workdir (a trained run) and --model (an exported HF directory)")
    if args.color and args.workdir is not None:
        raise JaxmedError("--color is for --model: a run's colour handling comes from its config (data.grayscale)")
    if args.checkpoint is not None and args.model is not None:
        raise JaxmedError("--checkpoint is for --workdir: an exported directory holds one set of weights")
    if args.batch_size < 0 or args.explain < 0:
        raise JaxmedError("--batch-size and --explain must not be negative")
    if not args.inputs:
        raise JaxmedError("no INPUT given: name image files, DICOM files or folders to predict")
    files, skipped, ignored = collect_inputs(args.inputs)
    if not files:
        notes = ([f"{ignored} non-image files ignored"] if ignored else []) + (
            [f"missing: {', '.join(path for path, _ in skipped[:3])}"] if skipped else [])
        raise JaxmedError(f"no images found in {', '.join(args.inputs[:3])}"
                          + (f" ({'; '.join(notes)})" if notes else ""))
    if args.strict and skipped:
        raise JaxmedError(_unreadable_message(skipped))
    predictor = load_predictor(workdir=args.workdir, model_dir=args.model, checkpoint=args.checkpoint or "best",
                               color=args.color, batch_size=args.batch_size or None)
    log.info("%d files to predict%s", len(files), f" ({ignored} non-image files in the folders ignored)"
             if ignored else "")
    result = predict_files(predictor, files, skipped=skipped, strict=args.strict, keep_images=args.explain)
    out = Path(args.out).expanduser()
    summary = write_outputs(out, predictor, result, ignored)
    if args.explain:
        summary["explained"] = len(explain(predictor, result, out / "explain"))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if result.skipped:
        log.warning("skipped %d unreadable inputs (listed in %s)", len(result.skipped), out / "skipped.csv")
    return summary


if __name__ == "__main__":
    sys.exit(main())
