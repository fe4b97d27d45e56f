"""The files of a cache being built, so that a large build is safe on a small or shared disk.

- Every file is allocated for real (posix_fallocate) before a byte is written, after a free-space check: a full
  disk is a one-line error naming both sizes, never a bus error in a sparse memory map.
- Rows are written with pwrite, never through a writable memory map: several hosts write disjoint rows of one
  file on a shared filesystem, and a dirty mmap page would carry its neighbours' stale bytes.
- Rows dropped after decoding (unreadable files, duplicates dropped from train) are removed in place, so the build
  never needs a second copy of the data (peak disk ≈ the final size).
- A build folder holds a lock file that its builder keeps locked (flock) until it is renamed; folders whose lock
  nobody holds belong to dead builds and are removed by the next build.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import shutil
import socket
from pathlib import Path

import numpy as np

from jaxmed.errors import JaxmedError

LOCK = "lock"
COPY_ROWS = 256  # rows moved at once when compacting


def header(shape: tuple[int, ...], dtype) -> bytes:
    """The .npy header of a C-ordered array; numpy leaves room for the first axis to grow, so a smaller first
    axis gives a header of the same length."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                  "fortran_order": False, "shape": tuple(shape)})
    return buffer.getvalue()


def nbytes(shape: tuple[int, ...], dtype) -> int:
    return len(header(shape, dtype)) + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def check_free_space(directory: Path, needed: int, key: str = "data.cache_dir") -> None:
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise JaxmedError(f"the decoded cache needs {needed:,} bytes ({needed / 2**30:.2f} GiB) but {directory} has "
                          f"{free:,} bytes ({free / 2**30:.2f} GiB) free — free some space or point {key} at a "
                          "larger disk")


def allocate(path: Path, shape: tuple[int, ...], dtype) -> None:
    """An .npy file of `shape` whose blocks are all allocated (zeros), so later writes cannot fail for space."""
    head = header(shape, dtype)
    with open(path, "wb") as handle:
        handle.write(head)
        handle.flush()
        try:
            os.posix_fallocate(handle.fileno(), 0, nbytes(shape, dtype))
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            raise JaxmedError(f"no space left on the device of {path.parent} for the decoded cache "
                              f"({nbytes(shape, dtype):,} bytes for {path.name}) — free some space or point "
                              "data.cache_dir at a larger disk") from None


class Rows:
    """Write access to the rows of an allocated .npy file."""

    def __init__(self, path: Path):
        self.path = path
        array = np.load(path, mmap_mode="r")
        self.shape, self.dtype, self.offset = array.shape, array.dtype, array.offset
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        del array
        self.fd = os.open(path, os.O_WRONLY)

    def write(self, row: int, values: np.ndarray) -> None:
        data = np.ascontiguousarray(values, self.dtype).reshape(self.shape[1:]).tobytes()
        written = os.pwrite(self.fd, data, self.offset + row * self.row_bytes)
        if written != len(data):
            raise OSError(f"short write to {self.path}")

    def close(self) -> None:
        os.close(self.fd)


def compact(path: Path, keep: np.ndarray) -> None:
    """Keeps rows `keep` (ascending) of an .npy file, in place: row k comes from row keep[k] ≥ k, so rows are
    read before they are overwritten; then the file is truncated and its header rewritten."""
    array = np.load(path, mmap_mode="r+")
    shape, dtype, offset = array.shape, array.dtype, array.offset
    keep = np.asarray(keep, np.int64)
    if len(keep) == shape[0]:
        return
    for start in range(0, len(keep), COPY_ROWS):
        rows = keep[start:start + COPY_ROWS]
        if rows[0] != start or rows[-1] != start + len(rows) - 1:
            array[start:start + len(rows)] = array[rows]
    array.flush()
    del array
    new_shape = (len(keep), *shape[1:])
    head = header(new_shape, dtype)
    if len(head) != offset:
        raise AssertionError(f"npy header of {path} changed length")
    with open(path, "r+b") as handle:
        handle.write(head)
        handle.truncate(nbytes(new_shape, dtype))


def hold_lock(folder: Path) -> int:
    """Creates and locks `folder`/lock (naming this host and process); the lock lasts while the fd is open."""
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
    return fd


def remove_stale(cache_dir: Path) -> list[Path]:
    """Removes the build folders (.*.tmp-*) of `cache_dir` whose lock no live build holds; → those removed."""
    removed = []
    for folder in sorted(cache_dir.glob(".*.tmp-*")) if cache_dir.is_dir() else ():
        try:
            fd = os.open(folder / LOCK, os.O_RDWR)
        except FileNotFoundError:
            continue  # being created this instant, or not ours
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live build
        finally:
            os.close(fd)
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed
