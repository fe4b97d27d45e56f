"""NIfTI volumes (.nii, .nii.gz: BraTS, OASIS, IXI) as 2-D slices, read with nibabel.

A volume is turned to the closest canonical (RAS+) orientation, so "axial" means the same slices whatever order the
scanner stored them in; a 4-D volume gives one frame (`data.volume_frame`). Intensities are windowed to the
volume's 0.5–99.5 percentiles (MRI has no Hounsfield scale; the tails are noise and bright vessels), slices are
resampled to square pixels when the voxels are anisotropic in-plane, and each slice is named `path#axis=index`.
Which slices: `data.volume_slices` = "middle", "all", or an integer k (k evenly spaced slices within the extent
where the volume is not empty). nibabel is imported only when a volume turns up.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from pathlib import Path

import numpy as np

from jaxmed.errors import JaxmedError, UnreadableImage

# Array axis of each slicing direction in RAS+ (x: left→right, y: posterior→anterior, z: inferior→superior).
AXES = {"sagittal": 0, "coronal": 1, "axial": 2}
SLICE_CHOICES = ("middle", "all")
WINDOW_PERCENTILES = (0.5, 99.5)
NIBABEL_HINT = "pip install 'jaxmed[nifti]' (nibabel)"
CACHED_VOLUMES = 8  # windowed uint8 volumes kept while their slices are decoded (slices of a volume come together)


def is_nifti_name(name: str) -> bool:
    lower = name.lower()
    return lower.endswith(".nii") or lower.endswith(".nii.gz")


@dataclasses.dataclass(frozen=True)
class VolumeSettings:
    axis: str = "axial"
    slices: str | int = "middle"
    frame: int = 0

    @classmethod
    def from_config(cls, data_config) -> VolumeSettings:
        """data.volume_axis / volume_slices / volume_frame, checked: a wrong value is an error naming the key."""
        axis = data_config.get("volume_axis", "axial")
        slices = data_config.get("volume_slices", "middle")
        frame = data_config.get("volume_frame", 0)
        if axis not in AXES:
            raise JaxmedError(f"data.volume_axis={axis!r} is not one of {', '.join(AXES)}")
        if isinstance(slices, bool) or not (slices in SLICE_CHOICES or (isinstance(slices, int) and slices >= 1)):
            raise JaxmedError(f"data.volume_slices={slices!r} must be 'middle', 'all' or a positive integer k "
                              "(k evenly spaced slices of each volume)")
        if isinstance(frame, bool) or not isinstance(frame, int) or frame < 0:
            raise JaxmedError(f"data.volume_frame={frame!r} must be a frame index >= 0 (4-D volumes)")
        return cls(axis, slices, frame)

    def to_dict(self) -> dict:
        return {"volume_axis": self.axis, "volume_slices": self.slices, "volume_frame": self.frame}


@dataclasses.dataclass(frozen=True)
class VolumeSlice:
    path: str
    axis: str
    index: int

    def __str__(self) -> str:
        return f"{self.path}#{self.axis}={self.index}"


@dataclasses.dataclass(frozen=True)
class UnreadableVolume:
    """A volume whose slices could not even be listed: it stays an item, so it is reported as skipped, not lost."""
    path: str
    reason: str

    def __str__(self) -> str:
        return self.path


class Volumes:
    """Lists and reads the slices of volumes with one VolumeSettings; thread-safe (the cache decodes in threads)
    and keeps the last few volumes, so the slices of a volume are read from one decompression."""

    def __init__(self, settings: VolumeSettings):
        self.settings = settings
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict = collections.OrderedDict()

    def expand(self, paths) -> list:
        """Each path as it is, except volumes: their VolumeSlices, or an UnreadableVolume with the reason."""
        from tqdm import tqdm

        entries, paths = [], list(paths)
        reads_voxels = isinstance(self.settings.slices, int)  # k slices of the non-empty extent: each volume read
        for path in tqdm(paths, unit="file", desc="listing volume slices", mininterval=1.0,
                         disable=not reads_voxels or sum(is_nifti_name(Path(p).name) for p in paths) < 20):
            if not is_nifti_name(Path(path).name):
                entries.append(path)
                continue
            try:
                entries += [VolumeSlice(str(path), self.settings.axis, index) for index in self.slice_indices(path)]
            except UnreadableImage as error:
                entries.append(UnreadableVolume(str(path), str(error)))
        return entries

    def slice_indices(self, path) -> list[int]:
        settings = self.settings
        if settings.slices == "all" or settings.slices == "middle":  # the header says how many: no voxels read
            count = _canonical_shape(_open(path), settings.frame)[AXES[settings.axis]]
            return list(range(count)) if settings.slices == "all" else [count // 2]
        volume, _ = self.volume(path)
        return evenly_spaced(nonempty_extent(volume, AXES[settings.axis]), settings.slices)

    def read(self, entry) -> np.ndarray:
        """uint8 (H, W) slice, square pixels; UnreadableImage for an unreadable volume."""
        if isinstance(entry, UnreadableVolume):
            raise UnreadableImage(entry.reason)
        volume, spacing = self.volume(entry.path)
        axis = AXES[entry.axis]
        if not 0 <= entry.index < volume.shape[axis]:
            raise UnreadableImage(f"slice {entry.index} asked for but the volume has {volume.shape[axis]} "
                                  f"{entry.axis} slices")
        return to_square_pixels(*oriented_slice(volume, spacing, axis, entry.index))

    def volume(self, path) -> tuple[np.ndarray, np.ndarray]:
        """load(path), from the cache when it was read lately."""
        key = str(path)
        with self._lock:  # one thread decompresses a volume; the others wait for it rather than repeat it
            if key not in self._cache:
                self._cache[key] = load(path, self.settings.frame)
                if len(self._cache) > CACHED_VOLUMES:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(key)
            return self._cache[key]


def load(path, frame: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 3-D volume in RAS+ orientation windowed to its 0.5–99.5 percentiles, voxel sizes (3,) in mm)."""
    import nibabel

    image = _open(path)
    try:
        image = nibabel.as_closest_canonical(_frame_image(image, frame))
        values = np.asarray(image.dataobj, dtype=np.float32)
    except UnreadableImage:
        raise
    except Exception as error:  # truncated gzip, short data, bad scaling... whatever nibabel meets
        raise UnreadableImage(f"cannot read the NIfTI voxel data ({type(error).__name__}: {error})") from None
    spacing = np.sqrt((image.affine[:3, :3] ** 2).sum(axis=0))  # voxel size along each array axis, RAS+ order
    return window(values), np.where(spacing > 0, spacing, 1.0)


def window(values: np.ndarray) -> np.ndarray:
    """Float volume → uint8: [0.5th, 99.5th] percentile of its finite voxels onto [0, 255], clipped."""
    finite = values[np.isfinite(values)]
    if not finite.size:
        raise UnreadableImage("the volume has no finite voxel values")
    low, high = np.percentile(finite, WINDOW_PERCENTILES)
    scale = 255.0 / (high - low) if high > low else 0.0
    scaled = (np.nan_to_num(values, nan=low, posinf=high, neginf=low) - low) * scale
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def nonempty_extent(volume: np.ndarray, axis: int) -> tuple[int, int]:
    """First and last slice along `axis` with a voxel above the window's floor; the whole axis if none has."""
    occupied = np.flatnonzero(np.moveaxis(volume, axis, 0).reshape(volume.shape[axis], -1).max(axis=1) > 0)
    if not len(occupied):
        return 0, volume.shape[axis] - 1
    return int(occupied[0]), int(occupied[-1])


def evenly_spaced(extent: tuple[int, int], count: int) -> list[int]:
    """The centres of `count` equal parts of [first, last] (k = 1: the middle of the extent); fewer when the
    extent has fewer slices."""
    first, last = extent
    length = last - first + 1
    return sorted({first + int((part + 0.5) * length / count) for part in range(count)})


def oriented_slice(volume: np.ndarray, spacing: np.ndarray, axis: int, index: int) -> tuple[np.ndarray, float, float]:
    """(slice, row spacing, column spacing), displayed as viewers do: superior (axial: anterior) at the top."""
    in_plane = [other for other in range(3) if other != axis]
    plane = np.take(volume, index, axis=axis)  # axes (in_plane[0], in_plane[1])
    return np.rot90(plane), float(spacing[in_plane[1]]), float(spacing[in_plane[0]])


def to_square_pixels(plane: np.ndarray, row_spacing: float, column_spacing: float) -> np.ndarray:
    """Resamples the coarser in-plane direction (OpenCV, linear) so one pixel is as wide as it is tall."""
    import cv2

    plane = np.ascontiguousarray(plane)
    finest = min(row_spacing, column_spacing)
    rows = max(1, round(plane.shape[0] * row_spacing / finest))
    columns = max(1, round(plane.shape[1] * column_spacing / finest))
    if (rows, columns) == plane.shape:
        return plane
    return cv2.resize(plane, (columns, rows), interpolation=cv2.INTER_LINEAR)


def _open(path):
    try:
        import nibabel
    except ImportError:
        raise UnreadableImage(f"NIfTI volumes need nibabel: {NIBABEL_HINT}") from None
    if Path(path).stat().st_size == 0:
        raise UnreadableImage("empty file (0 bytes)")
    try:
        return nibabel.load(str(path))
    except Exception as error:
        raise UnreadableImage(f"not a readable NIfTI volume ({type(error).__name__}: {' '.join(str(error).split())})"
                              ) from None


def _frame_image(image, frame: int):
    """The 3-D image of `frame` (a 2-D image gets a third axis of one slice); trailing axes of length 1 dropped."""
    import nibabel

    shape = image.shape
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) == 2:
        return nibabel.Nifti1Image(np.asanyarray(image.dataobj)[:, :, None], image.affine)
    if len(shape) == 3:
        return image.slicer[(slice(None),) * 3 + (0,) * (len(image.shape) - 3)] if len(image.shape) > 3 else image
    if len(shape) == 4:
        if not 0 <= frame < shape[3]:
            raise UnreadableImage(f"frame {frame} asked for (data.volume_frame) but the volume has {shape[3]} "
                                  f"frames, 0..{shape[3] - 1}")
        return image.slicer[(slice(None),) * 3 + (frame,) + (0,) * (len(image.shape) - 4)]
    raise UnreadableImage(f"a {len(shape)}-D volume of shape {image.shape}: only 3-D and 4-D NIfTI are supported")


def _canonical_shape(image, frame: int) -> tuple[int, int, int]:
    """The RAS+ shape of the frame's volume from the header alone (as_closest_canonical permutes the axes so)."""
    import nibabel

    frame_image = _frame_image(image, frame)
    order = nibabel.io_orientation(frame_image.affine)[:, 0].astype(int)  # output axis of each input axis
    shape = [0, 0, 0]
    for source_axis, target_axis in enumerate(order):
        shape[target_axis] = frame_image.shape[source_axis]
    return tuple(shape)
