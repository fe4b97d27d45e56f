"""Patient-level splits: data.group_pattern keeps every patient on one side of a carved split, reports patients
shared by the given splits, and W/splits.csv records it all, byte for byte the same for the same config and seed."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxmed import protocols
from jaxmed.data import default_config, load_dataset
from jaxmed.data.preprocess import Preprocessor
from jaxmed.data.splits import patient_groups
from jaxmed.errors import JaxmedError

ROOT = Path(__file__).resolve().parents[1]
VIT = Preprocessor(processor_type="ViTImageProcessor", size={"height": 16, "width": 16})


def test_kermany_pattern_finds_the_patient_in_every_naming_scheme():
    names = ["PNEUMONIA/person1_bacteria_1.jpeg", "PNEUMONIA/person1_virus_7.jpeg", "PNEUMONIA/person12_virus_3.jpeg",
             "NORMAL/IM-0115-0001.jpeg", "NORMAL/NORMAL2-IM-0381-0001.jpeg", "NORMAL/IM-0381-0002.jpeg"]
    groups = patient_groups(names, protocols.KERMANY_PATIENT, strict=True)
    assert groups.tolist() == ["person1", "person1", "person12", "IM-0115", "NORMAL2-IM-0381", "IM-0381"]


def test_unmatched_names_are_an_error_when_strict_else_their_own_group():
    names = ["a/person1_virus_1.jpeg", "a/scan.png"]
    with pytest.raises(JaxmedError, match="does not match 1 of 2 images: a/scan.png"):
        patient_groups(names, protocols.KERMANY_PATIENT, strict=True)
    assert patient_groups(names, protocols.KERMANY_PATIENT, strict=False).tolist() == ["person1",
                                                                                        "unmatched:a/scan.png"]
    with pytest.raises(JaxmedError, match="matches none of the 2 images"):
        patient_groups(names, r"(patient\d+)", strict=False)
    with pytest.raises(JaxmedError, match="no capture group"):
        patient_groups(names, r"person\d+", strict=False)


def _kermany_folder(root: Path) -> Path:
    """chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}: 3–4 images per patient; patients 0 and 1 also in test."""
    rng = np.random.default_rng(0)
    layout = {"train": range(0, 24), "val": range(24, 26), "test": [0, 1, 30, 31, 32, 33]}
    for split, patients in layout.items():
        for patient in patients:
            pneumonia = patient % 2 == 1
            folder = root / "chest_xray" / split / ("PNEUMONIA" if pneumonia else "NORMAL")
            folder.mkdir(parents=True, exist_ok=True)
            for image in range(3 + patient % 2):
                name = (f"person{patient}_{'virus' if image % 2 else 'bacteria'}_{split}{image}.jpeg" if pneumonia
                        else f"IM-{patient:04d}-{split}{image}.jpeg")
                Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(folder / name)
    return root


def _config(tmp_path, root, cache):
    config = default_config()
    config.update(format="imagefolder", root=str(root), cache_dir=str(tmp_path / cache), decode_threads=2,
                  cache_size=16, merge_train_val=True, val_fraction=0.25, group_pattern=protocols.KERMANY_PATIENT)
    return config


def test_merged_and_recarved_by_patient_with_shared_patients_reported(tmp_path):
    root = _kermany_folder(tmp_path / "data")
    dataset = load_dataset(_config(tmp_path, root, "cache"), VIT)
    train, val, test = (set(dataset.splits[name].groups) for name in ("train", "val", "test"))
    assert not train & val  # the carved val holds whole patients
    assert len(val) >= 4 and len(dataset.splits["val"]) > 0
    assert (train | val) & test == {"IM-0000", "person1"}  # the given test shares two patients with train+val
    report = dataset.leakage["patients"]
    assert report["pairs"]["train-val"]["shared_patients"] == 0
    pairs = [report["pairs"][pair] for pair in ("train-test", "val-test")]
    assert sum(pair["shared_patients"] for pair in pairs) == 2
    assert {example["patient"] for pair in pairs for example in pair["examples"]} == {"IM-0000", "person1"}
    # both classes stay on both sides (stratified group folds)
    assert set(dataset.splits["val"].labels.tolist()) == {0, 1}

    text = dataset.splits_csv()
    lines = text.splitlines()
    assert lines[0] == "id,split,class,group" and len(lines) == 1 + sum(len(s) for s in dataset.splits.values())
    assert any(line.endswith(",val,PNEUMONIA," + line.rsplit(",", 1)[1]) for line in lines[1:])
    again = load_dataset(_config(tmp_path, root, "other_cache"), VIT)  # built anew, same config and seed
    assert again.directory != dataset.directory and again.splits_csv() == text


def test_without_a_pattern_the_group_column_is_empty(tmp_path):
    root = _kermany_folder(tmp_path / "data")
    config = _config(tmp_path, root, "cache")
    config.group_pattern = ""
    dataset = load_dataset(config, VIT)
    assert "patients" not in dataset.leakage
    assert all(line.endswith(",") for line in dataset.splits_csv().splitlines()[1:])


def test_a_pattern_that_matches_nothing_is_a_one_line_error_from_the_cli(tmp_path):
    root = _kermany_folder(tmp_path / "data")
    command = [sys.executable, "-m", "jaxmed.main", "--config", str(ROOT / "tests/tiny_config.py"),
               "--workdir", str(tmp_path / "run"), "--config.data.format=imagefolder", f"--config.data.root={root}",
               f"--config.data.cache_dir={tmp_path / 'cache'}", r"--config.data.group_pattern=(patient\d+)"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "matches none of the" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_calibration_split_is_carved_from_train_by_patient_and_listed(tmp_path):
    root = _kermany_folder(tmp_path / "data")
    config = _config(tmp_path, root, "cache")
    before = load_dataset(config, VIT)
    config.calibration_fraction = 0.25
    dataset = load_dataset(config, VIT)
    assert dataset.directory != before.directory and "calibration" not in before.splits
    groups = {name: set(split.groups) for name, split in dataset.splits.items()}
    assert groups["calibration"] and not groups["calibration"] & (groups["train"] | groups["val"])
    assert groups["val"] == set(before.splits["val"].groups)  # val is carved first, exactly as before
    assert groups["train"] | groups["calibration"] == set(before.splits["train"].groups)
    assert set(dataset.splits["calibration"].labels.tolist()) == {0, 1}  # stratified
    assert dataset.splits["calibration"].model_ready  # evaluation-size images, like val and test
    rows = [line.split(",") for line in dataset.splits_csv().splitlines()[1:]]
    assert sum(row[1] == "calibration" for row in rows) == len(dataset.splits["calibration"])


def test_calibration_split_without_groups_is_a_stratified_fraction_of_train():
    from jaxmed.data.splits import plan

    labels = np.repeat([0, 1, 2], [60, 30, 10])
    origin = np.full(100, "train", dtype=object)
    origin[::10] = "test"
    rows = plan(origin, labels, np.ones(100, bool), val_fraction=0.2, seed=42, merge_train_val=False,
                calibration_fraction=0.25)
    assert sorted(np.concatenate(list(rows.values())).tolist()) == list(range(100))
    assert len(rows["calibration"]) == round(0.25 * (90 - len(rows["val"])))
    pool = np.concatenate([rows["train"], rows["calibration"]])  # what was left of train after val
    share = np.bincount(labels[pool]) * len(rows["calibration"]) / len(pool)
    assert np.abs(np.bincount(labels[rows["calibration"]]) - share).max() <= 1  # stratified
    assert not set(rows["calibration"]) & (set(rows["val"]) | set(rows["train"]) | set(rows["test"]))
    assert "calibration" not in plan(origin, labels, np.ones(100, bool), val_fraction=0.2, seed=42,
                                     merge_train_val=False)
