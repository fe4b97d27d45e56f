"""Dataset sources, chosen by `data.format`: each gives class names and, per split, ids, labels and a reader.

Readers return a PIL image or an array and raise on unreadable data; hygiene, decoding into the cache and the
bookkeeping of unreadable files happen in cache.py, the same for every format.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from jaxmed.data import decode, nifti, synthetic
from jaxmed.errors import JaxmedError

# Folder / split names users' datasets use for each of our splits (compared case-insensitively).
SPLIT_NAMES = {"train": ("train", "training"), "val": ("val", "valid", "validation", "dev"),
               "test": ("test", "testing")}
def download_hint(config) -> str:
    """What to do about missing data: the config's own `data.source` (where this dataset comes from), if set."""
    where = config.get("source", "") or "download the dataset (e.g. BRISC 2025 from Kaggle)"
    return f"{where} and pass --config.data.root=PATH, or try the built-in data: configs/demo.py"


@dataclasses.dataclass
class SourceSplit:
    ids: list[str]
    labels: np.ndarray  # int64 (N,)
    read: Callable[[int], Image.Image | np.ndarray]  # raises on unreadable data
    where: str = ""  # for messages: the folder or name of this split
    root: str = ""  # the folder file ids are relative to, for data.group_pattern; empty: ids are matched as they are
    groups: list[str] | None = None  # patient id of each item when the source knows it (the slices of a volume are
    #                                  one patient); data.group_pattern, when set, decides instead

    def names(self) -> list[str]:
        """Each image's name as data.group_pattern sees it: its path relative to the split folder, or its id."""
        if not self.root:
            return list(self.ids)
        return [os.path.relpath(image_id, self.root).replace(os.sep, "/") for image_id in self.ids]


@dataclasses.dataclass
class Source:
    description: str  # for messages and logs, e.g. "imagefolder data/brisc/classification_task"
    class_names: list[str]
    splits: dict[str, SourceSplit]  # "train", "test", optionally "val"
    identity: dict  # JSON-able; what the cache key hashes (file list + sizes + mtimes, fingerprints, settings)


def open_source(config) -> Source:
    loader = LOADERS.get(config.format)
    if loader is None:
        raise JaxmedError(f"data.format={config.format!r} is not one of {', '.join(LOADERS)}")
    if config.format != "synthetic" and not config.root:
        raise JaxmedError(f"data.root is empty for data.format={config.format!r} — {download_hint(config)}")
    return loader(config)


# ---------------------------------------------------------------------------------------------- imagefolder

def imagefolder(config) -> Source:
    """One folder per class under split folders; the real Kaggle layouts are recognised (see find_split_folders)."""
    root = Path(config.root).expanduser()
    folders = find_split_folders(root, config)
    train_classes = _class_folders(folders["train"])
    if not train_classes:
        raise JaxmedError(f"no class folders under {folders['train']} — expected one folder per class; "
                          f"{download_hint(config)}")
    class_names = sorted(train_classes)
    volumes = nifti.Volumes(nifti.VolumeSettings.from_config(config))
    splits, stats, volume_files = {}, [], 0
    for split, folder in folders.items():
        classes = _class_folders(folder)
        unknown = sorted(set(classes) - set(class_names))
        if unknown:
            raise JaxmedError(f"{folder} has classes {unknown} that {folders['train']} does not have "
                              f"({class_names}); rename or remove them")
        entries, labels = [], []
        for name in sorted(classes):
            files = _image_files(classes[name])
            if not files:
                raise JaxmedError(f"no images under {classes[name]} (class {name!r} of {split}) — an empty class "
                                  "cannot be learnt or evaluated; remove the folder or add its images")
            expanded = volumes.expand(files)  # a NIfTI volume becomes its slices (or one unreadable item)
            entries += expanded
            labels += [class_names.index(name)] * len(expanded)
            stats += [(str(path.relative_to(root)), *_stat(path)) for path in files]
            volume_files += sum(nifti.is_nifti_name(path.name) for path in files)
        splits[split] = SourceSplit([str(entry) for entry in entries], np.asarray(labels, np.int64),
                                    _file_reader(entries, config.get("dicom_frame", -1), volumes), str(folder),
                                    str(folder))
        # all slices of a volume are one patient (its path), so carved splits and folds keep volumes whole
        splits[split].groups = [os.path.relpath(getattr(entry, "path", entry), folder).replace(os.sep, "/")
                                for entry in entries]
    identity = {"root": str(root.resolve()), "files": _digest(stats)}
    if volume_files:
        identity["volumes"] = volumes.settings.to_dict()  # other slices are other images: another cache
    else:  # plain images keep today's splits (scikit-learn's train_test_split, no groups)
        for part in splits.values():
            part.groups = None
    return Source(f"imagefolder {root}", class_names, splits, identity)


def find_split_folders(root: Path, config) -> dict[str, Path]:
    """{"train": ..., "test": ..., "val"?: ...} for BRISC `classification_task/{train,test}`, Kermany
    `chest_xray/{train,val,test}`, Nickparvar `{Training,Testing}` or plain `{train,val,test}`, at `root` or a few
    folders below it (Kaggle archives nest them); the shallowest match wins."""
    if not root.is_dir():
        raise JaxmedError(f"data.root={str(root)!r} is not a directory — {download_hint(config)}")
    level = [root]
    for _ in range(4):
        for directory in level:
            found = _split_children(directory)
            if "train" in found:
                return found
        level = [child for directory in level for child in _subfolders(directory)]
    raise JaxmedError(f"no images under {root}: found no train/Training folder with one folder per class (the "
                      f"layouts of BRISC classification_task/{{train,test}}, Kermany chest_xray/{{train,val,test}}, "
                      f"Nickparvar {{Training,Testing}}) — {download_hint(config)}")


def _split_children(directory: Path) -> dict[str, Path]:
    found = {}
    for child in _subfolders(directory):
        for split, names in SPLIT_NAMES.items():
            if child.name.lower() in names and split not in found:
                found[split] = child
    return found


def _subfolders(directory: Path) -> list[Path]:
    return sorted(child for child in directory.iterdir() if child.is_dir() and not decode.is_junk(child.name))


def _class_folders(split_folder: Path) -> dict[str, Path]:
    return {child.name: child for child in _subfolders(split_folder)}


def _image_files(folder: Path) -> list[Path]:
    files = []
    for directory, subdirectories, names in os.walk(folder):
        subdirectories[:] = sorted(name for name in subdirectories if not decode.is_junk(name))
        files += [Path(directory) / name for name in sorted(names)
                  if decode.is_image_file(Path(directory) / name)]
    return files


def _file_reader(entries: list, dicom_frame: int = -1, volumes: nifti.Volumes | None = None) -> Callable:
    """Image files through decode.open_image; the slices of NIfTI volumes (nifti.Volumes.expand) through nifti."""
    def read(index: int):
        entry = entries[index]
        if isinstance(entry, (nifti.VolumeSlice, nifti.UnreadableVolume)):
            return volumes.read(entry)
        return decode.open_image(entry, dicom_frame=dicom_frame)
    return read


def _stat(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _tree_identity(root: Path) -> dict:
    stats = [(str(path.relative_to(root)), *_stat(path)) for path in sorted(root.rglob("*"))
             if path.is_file() and not any(decode.is_junk(part) for part in path.relative_to(root).parts)]
    return {"root": str(root.resolve()), "files": _digest(stats)}


def _our_split(name: str) -> str | None:
    return next((split for split, names in SPLIT_NAMES.items() if name.lower() in names), None)


# ---------------------------------------------------------------------------------------------- Hugging Face

def huggingface(config) -> Source:
    """`datasets`: a save_to_disk directory, a folder of split folders, parquet files, or a hub id when online."""
    import datasets  # heavy; only this format needs it

    path = Path(config.root).expanduser()
    try:
        if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            loaded = datasets.load_from_disk(str(path))
        elif path.is_dir() and _has_split_folders(path):
            # datasets' own imagefolder inference merges Training/Testing into one "train" split: name them.
            files = {name: str(folder / "**") for name, folder in find_split_folders(path, config).items()}
            loaded = datasets.load_dataset("imagefolder", data_files=files)
        elif path.is_file() and path.suffix == ".parquet":
            loaded = datasets.load_dataset("parquet", data_files={"train": str(path)})
        else:
            loaded = datasets.load_dataset(str(path) if path.exists() else config.root)
    except Exception as error:
        raise JaxmedError(f"could not load the Hugging Face dataset {config.root!r}: {error} — pass a local "
                          "directory (save_to_disk, parquet files or split folders) when offline") from None
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    tables = {}
    for name, table in loaded.items():
        split = _our_split(name)
        if split is None:
            raise JaxmedError(f"Hugging Face split {name!r} of {config.root} is not train/val/test "
                              f"(known names: {SPLIT_NAMES})")
        tables[split] = table
    if "train" not in tables:
        raise JaxmedError(f"{config.root} has no train/Training split (splits: {list(loaded)})")
    features = tables["train"].features
    image_column = next((k for k, f in features.items() if isinstance(f, datasets.Image)), None)
    label_column = next((k for k, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    if image_column is None or label_column is None:
        raise JaxmedError(f"{config.root} needs an Image column and a ClassLabel column; features: {features}")
    class_names = list(features[label_column].names)
    splits = {}
    for split, table in tables.items():
        raw = table.cast_column(image_column, datasets.Image(decode=False))
        splits[split] = SourceSplit([f"hf:{split}/{index}" for index in range(len(raw))],
                                    np.asarray(raw[label_column], np.int64), _hf_reader(raw, image_column),
                                    f"{config.root} [{split}]")
    if path.exists():
        identity = _tree_identity(path)
    else:
        identity = {"hub": config.root, "fingerprints": {split: t._fingerprint for split, t in tables.items()}}
    return Source(f"hf {config.root}", class_names, splits, identity)


def _has_split_folders(path: Path) -> bool:
    """Train/test folders of images, rather than a hub-style repository of parquet files."""
    return "train" in _split_children(path) and not any(path.glob("*.parquet")) and not (path / "data").is_dir()


def _hf_reader(table, column: str) -> Callable[[int], Image.Image]:
    def read(index: int) -> Image.Image:
        cell = table[index][column]
        return decode.open_image(cell["bytes"] if cell.get("bytes") else cell["path"])
    return read


# ---------------------------------------------------------------------------------------------- MedMNIST npz

def npz(config) -> Source:
    """MedMNIST layout: train/val/test _images (uint8 N×H×W(×3)) and _labels (N×1)."""
    path = Path(config.root).expanduser()
    if not path.is_file():
        raise JaxmedError(f"data.root={config.root!r} is not an .npz file — download a MedMNIST npz "
                          "(e.g. pathmnist.npz) and pass --config.data.root=PATH")
    with np.load(path) as archive:
        keys = set(archive.files)
        present = [split for split in ("train", "val", "test") if f"{split}_images" in keys]
        if "train" not in present or any(f"{split}_labels" not in keys for split in present):
            raise JaxmedError(f"{path} lacks the MedMNIST keys train_images/train_labels (+ val_/test_); "
                              f"it has {sorted(keys)}")
        labels = {split: _npz_labels(archive[f"{split}_labels"], path, split) for split in present}
    num_classes = int(max(labels[split].max(initial=0) for split in present)) + 1
    class_names = _given_class_names(config, num_classes, path)
    splits = {split: SourceSplit([f"npz:{split}/{index}" for index in range(len(labels[split]))], labels[split],
                                 _npz_reader(path, f"{split}_images"), f"{path} [{split}]") for split in present}
    return Source(f"npz {path}", class_names, splits, {"path": str(path.resolve()), "stat": _stat(path)})


def _npz_labels(labels: np.ndarray, path: Path, split: str) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise JaxmedError(f"{path} {split}_labels has shape {labels.shape}: multi-label data (e.g. ChestMNIST) "
                          "is not supported; jaxmed trains single-label classifiers")
    return labels.reshape(-1).astype(np.int64)


def _npz_reader(path: Path, key: str) -> Callable[[int], np.ndarray]:
    def load() -> np.ndarray:
        with np.load(path) as archive:
            return archive[key]
    images = _once(load)  # an npz member is read whole: once, not once per image
    return lambda index: images()[index]


def _given_class_names(config, num_classes: int, where) -> list[str]:
    names = list(config.get("class_names", ()) or ())
    if not names:
        return [f"class_{index}" for index in range(num_classes)]
    if len(names) < num_classes:
        raise JaxmedError(f"data.class_names has {len(names)} names but {where} has {num_classes} classes")
    return names


# ---------------------------------------------------------------------------------------------- TFDS

def tfds(config) -> Source:
    """A TFDS dataset prepared as array_record, read with random access (`as_data_source`); no TensorFlow needed."""
    try:
        import tensorflow_datasets
    except ImportError:
        raise JaxmedError("data.format='tfds' needs tensorflow-datasets: pip install 'jaxmed[tfds]'") from None
    directory = _tfds_directory(Path(config.root).expanduser())
    builder = tensorflow_datasets.builder_from_directory(str(directory))
    features = builder.info.features
    image_key = next((k for k, f in features.items() if isinstance(f, tensorflow_datasets.features.Image)), None)
    label_key = next((k for k, f in features.items() if isinstance(f, tensorflow_datasets.features.ClassLabel)),
                     None)
    if image_key is None or label_key is None:
        raise JaxmedError(f"{directory} needs an Image feature and a ClassLabel feature; features: {features}")
    splits = {}
    for name in builder.info.splits:
        split = _our_split(name)
        if split is None:
            continue
        try:
            # Undecoded images: labels are read without decoding every image, and images go through PIL like
            # every other format.
            records = builder.as_data_source(split=name,
                                              decoders={image_key: tensorflow_datasets.decode.SkipDecoding()})
        except Exception as error:
            raise JaxmedError(f"cannot read {directory} split {name!r} with random access ({error}); prepare it "
                              "with file_format='array_record'") from None
        labels = np.asarray([records[index][label_key] for index in range(len(records))], np.int64)
        splits[split] = SourceSplit([f"tfds:{name}/{index}" for index in range(len(records))], labels,
                                    _tfds_reader(records, image_key), f"{directory} [{name}]")
    if "train" not in splits:
        raise JaxmedError(f"{directory} has no train split (splits: {list(builder.info.splits)})")
    class_names = list(features[label_key].names)
    return Source(f"tfds {directory}", class_names, splits, _tree_identity(directory))


def _tfds_directory(root: Path) -> Path:
    found = sorted(path.parent for path in root.rglob("dataset_info.json")) if root.is_dir() else []
    if len(found) != 1:
        what = "no prepared dataset (dataset_info.json)" if not found else f"several datasets {found}"
        raise JaxmedError(f"{what} under data.root={str(root)!r} — pass the directory of one prepared TFDS "
                          "dataset version, e.g. ~/tensorflow_datasets/NAME/CONFIG/VERSION")
    return found[0]


def _tfds_reader(records, key: str) -> Callable[[int], Image.Image]:
    return lambda index: decode.open_image(records[index][key])


# ---------------------------------------------------------------------------------------------- synthetic

def synthetic_phantoms(config) -> Source:
    """The built-in brain-MRI phantoms (synthetic.py); identity = its settings and generator version."""
    settings = config.synthetic
    counts = {"train": settings.train_per_class, "test": settings.test_per_class}
    splits = {}
    for split, per_class in counts.items():
        if per_class <= 0:
            continue
        labels = np.repeat(np.arange(len(synthetic.CLASS_NAMES)), per_class)  # generate() is class-sorted
        ids = [f"synthetic:{split}/{synthetic.CLASS_NAMES[label]}/{index}" for index, label in enumerate(labels)]
        reader = _synthetic_reader(split, per_class, settings.size, settings.seed)
        splits[split] = SourceSplit(ids, labels, reader, f"synthetic {split}")
    identity = {"synthetic": settings.to_dict(), "version": synthetic.VERSION}
    return Source("synthetic brain-MRI phantoms", list(synthetic.CLASS_NAMES), splits, identity)


def _synthetic_reader(split: str, per_class: int, size: int, seed: int) -> Callable[[int], np.ndarray]:
    images = _once(lambda: synthetic.generate(split, per_class, size, seed)[0])  # a cached run never generates
    return lambda index: images()[index]


def _once(load: Callable):
    """A getter of load()'s value, computed on first use; thread-safe because readers run in a thread pool."""
    lock, value = threading.Lock(), []

    def get():
        if not value:
            with lock:
                if not value:
                    value.append(load())
        return value[0]
    return get


LOADERS = {"imagefolder": imagefolder, "hf": huggingface, "npz": npz, "tfds": tfds,
           "synthetic": synthetic_phantoms}
