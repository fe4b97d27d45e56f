"""Classify new images with a trained run or an exported model: the run's own evaluation preprocessing, one CSV row
per image, unreadable files listed with the reason, and optional Grad-CAM / attention-rollout overlays.

    python -m jaxmed.predict (--workdir W [--checkpoint best|latest|STEP] | --model HF_DIR) INPUT... --out DIR
                             [--explain N] [--strict] [--batch-size B] [--color]

DIR gets predictions.csv (path, prediction, p_<class>…, flagged when the run has an operating point, temperature,
prediction_set: the conformal set from conformal.json, class names joined by '|', empty without one),
skipped.csv (path, reason), summary.json and explain/. Probabilities are softmax(logits / T) with T from
calibration.json next to the model ({"temperature": T}; else T = 1), and rows are flagged when
p_<positive_class> >= threshold from operating_point.json ({"positive_class": name, "threshold": t}); evaluation
writes both for the checkpoint it evaluated, and a file naming another checkpoint is not applied (summary: notes).
jaxmed.export copies both into HF_DIR with jaxmed_input.json (the run's data.grayscale and data.dicom_frame), so
--model predicts as --workdir does. Rows also get ood_score and out_of_distribution (true/false) from the OOD
detectors evaluation fitted for the checkpoint (W/ood, HF_DIR/ood), with a warning when more than a quarter of the
inputs are out of distribution; without them (a run evaluated before jaxmed had them) both are empty.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import logging
import math
import os
import re
import sys
from pathlib import Path

import numpy as np

from jaxmed.cli import OneLineParser, data_overrides, run_command
from jaxmed.data import decode, nifti
from jaxmed.errors import JaxmedError
from jaxmed.predict_outputs import write_outputs

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
    conformal: dict | None = None  # conformal.json's thresholds for this model's calibrated probabilities
    volumes: nifti.VolumeSettings = nifti.VolumeSettings()  # how NIfTI inputs become slices: the run's data.volume_*
    ood: object = None  # jaxmed.evaluate.ood.Fitted from W/ood (HF_DIR/ood), or None: OOD columns left empty


def load_predictor(*, workdir=None, model_dir=None, checkpoint: str = "best", color: bool = False,
                   batch_size: int | None = None, data_arguments=()) -> Predictor:
    from jaxmed.convert import hub
    from jaxmed.data import cache
    from jaxmed.data.preprocess import Preprocessor
    from jaxmed.evaluate import conformal

    if workdir is not None:
        from jaxmed import export
        from jaxmed.config import load_run_config
        from jaxmed.train.checkpoint import workdir_path
        import jax.numpy as jnp

        directory = workdir_path(workdir)
        config = load_run_config(directory)  # "no config.json …: is this a jaxmed run directory?"
        overrides = data_overrides(data_arguments, config.data)  # --config.data.KEY=VALUE: what differs now
        config.data.update(overrides)
        stored = _stored_with(directory)
        model, source = export.load_trained(directory, checkpoint, dtype=jnp.dtype(config.model.dtype))
        grayscale, frame = bool(config.data.grayscale), int(config.data.get("dicom_frame", -1))
        volumes = nifti.VolumeSettings.from_config(config.data)
        origin, batch_size = {"checkpoint": f"{directory} {source}"}, batch_size or config.train.eval_batch_size
        if overrides:
            origin["data_overrides"] = overrides
    else:
        if data_arguments:
            raise JaxmedError(f"{data_arguments[0]}: --config.data.* is for --workdir (a run's config); an exported "
                              "directory has none")
        directory = Path(model_dir).expanduser()
        if not directory.is_dir():  # hub.resolve would try the internet for a name that looks like a hub id
            raise JaxmedError(f"--model {model_dir}: no such directory; pass a folder written by "
                              "`python -m jaxmed.export --workdir W --out DIR`")
        stored = _stored_with(directory)
        model, source = hub.from_pretrained(directory), None
        grayscale, frame = _exported_input(directory, color)
        from jaxmed.export import INPUT_FILE

        volumes = nifti.VolumeSettings.from_config(_read_json(directory / INPUT_FILE) or {})
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
                     batch_size or DEFAULT_BATCH_SIZE, notes,
                     conformal.read_stored(directory, source, temperature, names, notes), volumes,
                     _ood_detectors(directory, source, notes))


def _ood_detectors(directory: Path, source: str | None, notes: list[str]):
    """The OOD detectors evaluation fitted for this checkpoint (W/ood, or ood/ in an export); None, with a note,
    for a run evaluated before jaxmed had them or one whose detectors belong to another checkpoint."""
    from jaxmed.evaluate import ood

    fitted = ood.load(directory / "ood")
    fitted_for = None if fitted is None else fitted.meta.get("checkpoint")
    if fitted is None:
        notes.append(f"no OOD detectors in {directory / 'ood'} (evaluated before jaxmed fitted them): ood_score and "
                     "out_of_distribution are empty; run python -m jaxmed.evaluate on the run to fit them")
    elif source is not None and fitted_for != source:
        notes.append(f"ood/ is for {fitted_for}, not {source}: not applied (ood_score and out_of_distribution empty)")
        fitted = None
    if fitted is None:
        log.warning("%s", notes[-1])
    return fitted


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
    volumes = nifti.Volumes(predictor.volumes)

    def work(path):
        try:
            if isinstance(path, (nifti.VolumeSlice, nifti.UnreadableVolume)):  # a slice of a NIfTI volume
                raw = volumes.read(path)
            else:
                raw = decode.open_image(path, dicom_frame=predictor.dicom_frame)
            image = decode.clean(raw, grayscale=predictor.grayscale)
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

    def logits_and_features(state, images):  # features: the pooled representation the OOD detectors read
        output = nnx.merge(graphdef, state).forward(predictor.preprocessor.normalize(images))
        return output.logits.astype(jnp.float32), output.features.astype(jnp.float32)

    step = jax.jit(logits_and_features, in_shardings=(replicated, batch), out_shardings=(replicated, replicated))
    log.info("batches of %d on %d of %d devices", predictor.batch_size, devices, jax.device_count())
    return lambda images: tuple(map(np.asarray, step(state, jax.device_put(images, batch))))


@dataclasses.dataclass
class Predictions:
    paths: list[str]
    logits: np.ndarray  # (N, classes) float32
    probabilities: np.ndarray  # (N, classes) float64, softmax(logits / temperature)
    flagged: np.ndarray | None  # (N,) bool at the operating point, or None without one
    skipped: list[tuple[str, str]]
    images: np.ndarray  # uint8 model-size images of the first `keep_images` rows (for --explain)
    prediction_sets: np.ndarray | None = None  # (N, classes) bool, conformal sets; None without conformal.json
    ood_scores: np.ndarray | None = None  # (N,) the stored detector's score (higher: less like the training data)
    out_of_distribution: np.ndarray | None = None  # (N,) bool, score above the threshold set on val


def predict_files(predictor: Predictor, files, *, skipped=(), strict: bool = False, keep_images: int = 0):
    from scipy.special import softmax
    from tqdm import tqdm

    from jaxmed.evaluate import conformal

    size = predictor.batch_size
    skipped, paths, logits, features, kept, digests = list(skipped), [], [], [], [], []
    forward, batch, batch_paths = _forward(predictor), [], []

    def flush():
        count = len(batch)
        padded = np.stack(batch + [np.zeros_like(batch[0])] * (size - count))  # one shape: one compilation
        batch_logits, batch_features = forward(padded)
        logits.append(batch_logits[:count]), features.append(batch_features[:count])
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
            digests.append(conformal.image_digest(image))  # the randomised sets' u: the same image, the same set
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
    result = Predictions(paths, logits, probabilities, flagged, skipped, images,
                         conformal.sets_for_stored(predictor.conformal, probabilities, digests))
    if predictor.ood is not None and paths:
        result.ood_scores, result.out_of_distribution = predictor.ood.score(np.concatenate(features), logits)
    return result


def _unreadable_message(skipped) -> str:
    listing = "; ".join(f"{path} ({reason})" for path, reason in skipped[:3])
    more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    return f"--strict: unreadable input {listing}{more}"


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
    return run_command(parser, argv, run, config_data=True)


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
                               color=args.color, batch_size=args.batch_size or None,
                               data_arguments=getattr(args, "config_data", ()))
    log.info("%d files to predict%s", len(files), f" ({ignored} non-image files in the folders ignored)"
             if ignored else "")
    volume_count = sum(nifti.is_nifti_name(path.name) for path in files)
    files = nifti.Volumes(predictor.volumes).expand(files)  # each NIfTI volume becomes its slices
    result = predict_files(predictor, files, skipped=skipped, strict=args.strict, keep_images=args.explain)
    out = Path(args.out).expanduser()
    summary = write_outputs(out, predictor, result, ignored)
    if volume_count:  # each slice is a row of predictions.csv (path#axis=index); an unreadable volume one of skipped
        summary["volumes"] = {"files": volume_count, "slices": sum(isinstance(entry, nifti.VolumeSlice)
                                                                  for entry in files), **predictor.volumes.to_dict()}
    if args.explain:
        summary["explained"] = len(explain(predictor, result, out / "explain"))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if result.skipped:
        log.warning("skipped %d unreadable inputs (listed in %s)", len(result.skipped), out / "skipped.csv")
    return summary


if __name__ == "__main__":
    sys.exit(main())
