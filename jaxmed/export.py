"""A trained run → a Hugging Face PyTorch directory that transformers opens without jaxmed.

    python -m jaxmed.export --workdir W --out DIR [--checkpoint best|latest|STEP]

DIR gets config.json (architectures, id2label/label2id of the run's classes), model.safetensors and
preprocessor_config.json. Only the checkpoint is read — not the data, not the devices it was trained on — and the
same weights always give the same bytes. The stacked autoencoder's directory is described in jaxmed/models/sae.py.

For `python -m jaxmed.predict --model DIR`, DIR also gets what a colleague without the run needs to predict as the
run does: jaxmed_input.json (the run's data.grayscale and data.dicom_frame) and, when evaluation stored them for the
exported checkpoint, the run's calibration.json (temperature), operating_point.json conformal.json (the
prediction sets' thresholds) and ood/ (the out-of-distribution detectors and threshold). transformers
ignores them.
"""

from __future__ import annotations

import json
import logging
import sys

from jaxmed.errors import JaxmedError

log = logging.getLogger("jaxmed.export")


def load_trained(workdir, which: str = "best", *, dtype=None):
    """(jaxmed model with the checkpoint's weights, in eval mode; the checkpoint's source) from a run directory.
    `dtype`: the compute dtype (the run's model.dtype reproduces its evaluation); None is float32."""
    from jaxmed.convert import hub
    from jaxmed.models import MODELS
    from jaxmed.models.layers import Static
    from jaxmed.train.checkpoint import Checkpoints, workdir_path
    from jaxmed.workdirs import check_trained

    workdir = workdir_path(workdir)
    check_trained(workdir)  # also: a cross-validation parent names its fold runs
    checkpoints = Checkpoints.of_run_dir(workdir)  # 'best' by the run's own metric (loss: the lowest)
    try:
        flat, meta, source = checkpoints.restore_flat_weights(which)
    finally:
        checkpoints.close()
    config_class, model_class = MODELS[meta["model_type"]]
    hf_config = config_class.from_dict(meta["hf_config"])
    names = meta["class_names"]
    hub.relabel(hf_config, len(names), dict(enumerate(names)))
    model = hub.build_with_weights(model_class, hf_config, flat, dtype=dtype)
    model.hf_preprocessor = Static(dict(meta["preprocessor"]))
    model.eval()
    return model, source


INPUT_FILE = "jaxmed_input.json"  # the run's input handling that preprocessor_config.json has no field for
STORED_WITH_RUN = ("calibration.json", "operating_point.json", "conformal.json")


def export(workdir, out, which: str = "best"):
    from pathlib import Path

    from jaxmed.config import load_run_config
    from jaxmed.convert import hub
    from jaxmed.data import nifti
    from jaxmed.train.checkpoint import workdir_path

    model, source = load_trained(workdir, which)
    path = Path(hub.save_pretrained(model, out))
    directory = workdir_path(workdir)
    if (directory / "config.json").exists():  # every jaxmed.main run has one; bare checkpoint folders do not
        data = load_run_config(directory).data
        (path / INPUT_FILE).write_text(json.dumps(
            {"grayscale": bool(data.grayscale), "dicom_frame": int(data.get("dicom_frame", -1)),
             **nifti.VolumeSettings.from_config(data).to_dict(),  # how NIfTI inputs become slices
             "exported_from": f"{directory} {source}"}, indent=1) + "\n")
    for name in STORED_WITH_RUN:
        stored = directory / name
        (path / name).unlink(missing_ok=True)  # a previous export's, into the same DIR
        value = json.loads(stored.read_text()) if stored.exists() else None
        if value is None:
            continue
        if value.get("checkpoint") != source:  # fitted on another checkpoint's logits: not this model's
            log.warning("%s is for %s, not the exported %s: not copied", stored, value.get("checkpoint"), source)
            continue
        (path / name).write_text(json.dumps(value, indent=1) + "\n")
    _copy_ood_detectors(directory, path, source)
    log.info("exported %s (%s, %d classes) to %s", source, model.config.model_type, model.config.num_labels, path)
    return path


def _copy_ood_detectors(workdir, out, source: str) -> None:
    """W/ood → DIR/ood when evaluation fitted it for the exported checkpoint (as calibration.json)."""
    import shutil

    from jaxmed.evaluate import ood

    shutil.rmtree(out / "ood", ignore_errors=True)  # a previous export's, into the same DIR
    fitted = ood.load(workdir / "ood")
    if fitted is None:
        return
    if fitted.meta.get("checkpoint") != source:
        log.warning("%s is for %s, not the exported %s: not copied", workdir / "ood", fitted.meta.get("checkpoint"),
                    source)
        return
    shutil.copytree(workdir / "ood", out / "ood")


def main(argv=None) -> int:
    from jaxmed.cli import OneLineParser, run_command

    parser = OneLineParser(prog="python -m jaxmed.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="the run directory given to jaxmed.main")
    parser.add_argument("--out", required=True, help="directory to write the HF model into")
    parser.add_argument("--checkpoint", default="best", help="best (default), latest, or a step number")
    parser.add_argument("--overwrite", action="store_true", help="replace the model files in an existing --out")
    return run_command(parser, argv, _export)


def _export(args) -> dict:
    from pathlib import Path

    out = Path(args.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise JaxmedError(f"--out {out} exists and is not empty: choose another --out, or add --overwrite to "
                          "replace its model files")
    return {"out": str(export(args.workdir, args.out, args.checkpoint))}


if __name__ == "__main__":
    sys.exit(main())
