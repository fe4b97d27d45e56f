"""grain pipelines over the cache: endless, shuffled, freshly augmented per-host training batches with a
checkpointable iterator; finite, padded, masked evaluation batches that cover every example exactly once.

Batches are dicts of numpy arrays: image uint8 (B, H, W, 3), label int32 (B,), index int64 (B,), mask bool (B,)
(False: padding, which the loss and metrics leave out). They stay uint8 — a quarter of float32's bytes to move —
and are normalised on the device inside the jitted step with `model_inputs`.
"""

from __future__ import annotations

import json
import math
import os
import sys

import grain
import numpy as np
from absl import flags

from jaxmed.data import augment
from jaxmed.data.dataset import Split
from jaxmed.data.preprocess import Preprocessor
from jaxmed.errors import JaxmedError


def train_iterator(split: Split, preprocessor: Preprocessor, *, batch_size: int, seed: int, augment_settings=None,
                   balanced: bool = False, num_workers: int = 0, process_index: int = 0, process_count: int = 1,
                   read_threads: int | None = None, drop_last: bool = False) -> grain.DatasetIterator:
    """Endless per-host batches of batch_size // process_count; `get_state()`/`set_state()` resume exactly.

    Each host takes every process_count-th example before shuffling (so hosts never share an example), then
    reshuffles every epoch from (seed, host). An epoch is `steps_per_epoch` batches: its last, partial batch is
    padded to the full shape (the sharding and the compiled step stay the same) with `mask` False on the padding,
    as torch's DataLoader with drop_last=False (the HF Trainer's default) yields it; `drop_last` drops it.
    `augment_settings`: an augment.Settings, the `data.augment` ConfigDict (its `enabled` flag is honoured) or
    None for the deterministic eval view. `balanced` draws
    examples with probability inverse to their class frequency, with replacement (torch WeightedRandomSampler).
    """
    local_batch = _local_batch_size(batch_size, process_count)
    rows = np.arange(process_index, len(split), process_count)
    if not len(rows) or (drop_last and len(rows) < local_batch):
        raise JaxmedError(f"split {split.name!r} has {len(split)} images: too few for batches of {batch_size} over "
                          f"{process_count} processes; lower the batch size"
                          + (" or set train.drop_last=False" if drop_last else ""))
    host_seed = int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])
    cached = _CachedRows(split, rows)
    # Whole batches of positions, then one transform per batch: grain's per-example shuffle/batch steps cost
    # 0.2 ms an example, as much as the augmentation itself.
    order = _EpochOrder(cached.labels, local_batch, host_seed, balanced,
                        steps_per_epoch(split, batch_size, shards=process_count, drop_last=drop_last))
    dataset = grain.MapDataset.source(order).seed(host_seed)
    settings = _settings(augment_settings)
    if settings is None:
        dataset = dataset.map(_PlainBatch(cached, preprocessor))
    else:
        dataset = dataset.random_map(_AugmentedBatch(cached, preprocessor, settings))
    threads = read_threads or (2 if num_workers else min(8, os.cpu_count() or 1))
    iterable = dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads))
    if num_workers:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside absl.app (tests, notebooks)
            flags.FLAGS.mark_as_parsed()  # nobody parsed them: use their defaults
        iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                                     per_worker_buffer_size=2))
    return iter(iterable)


class ShardedIterator:
    """This host's part of the global batch when the data is cut into more shards than there are hosts: the
    concatenation of its shards' batches, in shard order — exactly what those shards' hosts would contribute."""

    def __init__(self, iterators: list):
        self.iterators = iterators

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batches = [next(iterator) for iterator in self.iterators]
        return {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}

    def get_state(self) -> bytes:  # grain's orbax handler stores bytes for iterators that are not its own
        return json.dumps([iterator.get_state() for iterator in self.iterators]).encode()

    def set_state(self, state: bytes) -> None:
        for iterator, shard_state in zip(self.iterators, json.loads(state)):
            iterator.set_state(shard_state)

    def start_prefetch(self) -> None:
        for iterator in self.iterators:
            getattr(iterator, "start_prefetch", lambda: None)()


def host_train_iterator(split: Split, preprocessor: Preprocessor, *, batch_size: int, shards: int,
                        process_index: int, process_count: int, **kwargs):
    """`train_iterator` for this host's shards (shards = process_count: just its own iterator)."""
    if shards % process_count:
        raise JaxmedError(f"data.shards={shards} must be a multiple of the {process_count} processes")
    per_host = shards // process_count
    iterators = [train_iterator(split, preprocessor, batch_size=batch_size,
                                process_index=shard, process_count=shards, **kwargs)
                 for shard in range(process_index * per_host, (process_index + 1) * per_host)]
    return iterators[0] if per_host == 1 else ShardedIterator(iterators)


def steps_per_epoch(split: Split | int, batch_size: int, *, shards: int = 1, drop_last: bool = False) -> int:
    """Global batches that show each training example once: ceil(N / B), with the last one partial, as the HF
    Trainer's DataLoader (dataloader_drop_last=False) has it; floor with `drop_last`. Over `shards` (hosts), the
    shard with the most examples sets the count, so every host steps together."""
    count = split if isinstance(split, int) else len(split)
    local_batch = _local_batch_size(batch_size, shards)
    if drop_last:
        return max(1, (count // shards) // local_batch)
    return max(1, math.ceil(math.ceil(count / shards) / local_batch))


class EvalBatches:
    """Finite per-host batches in split order; the last is padded, `mask` marks real examples.

    Every host yields the same number of batches (multi-host steps must match), and across hosts every example
    appears exactly once. Val/test are cached as the model's input already, so this is slicing a memmap.
    """

    def __init__(self, split: Split, preprocessor: Preprocessor, *, batch_size: int, process_index: int = 0,
                 process_count: int = 1):
        self.split, self.preprocessor = split, preprocessor
        self.batch_size = _local_batch_size(batch_size, process_count)
        self.rows = np.arange(process_index, len(split), process_count)
        self.num_batches = math.ceil(math.ceil(len(split) / process_count) / self.batch_size)
        self.output = _output_size(preprocessor)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        for start in range(0, self.num_batches * self.batch_size, self.batch_size):
            rows = self.rows[start:start + self.batch_size]
            images = np.zeros((self.batch_size, *self.output, 3), np.uint8)
            if self.split.model_ready:
                images[:len(rows)] = self.split.images[rows]
            for position, row in enumerate(rows if not self.split.model_ready else ()):
                images[position] = eval_view(self.split.images[row], self.split.sizes[row], self.preprocessor,
                                             self.output, model_ready=False, gray=self.split.grayscale)
            labels = np.zeros(self.batch_size, np.int32)
            labels[:len(rows)] = self.split.labels[rows]
            index = np.full(self.batch_size, -1, np.int64)
            index[:len(rows)] = rows
            yield {"image": images, "label": labels, "index": index, "mask": index >= 0}


def eval_batches(split: Split, preprocessor: Preprocessor, *, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> EvalBatches:
    return EvalBatches(split, preprocessor, batch_size=batch_size, process_index=process_index,
                       process_count=process_count)


def eval_view(image: np.ndarray, size, preprocessor: Preprocessor, output: tuple[int, int], model_ready: bool,
              gray: bool = False) -> np.ndarray:
    """The model's eval input from a cached image: as is for val/test; for the train cache, the processor's
    resize + centre crop region, resampled once (close to, not bit-equal with, the processor on the file)."""
    if model_ready:
        return np.asarray(image)
    height, width = int(size[0]), int(size[1])
    box = augment.eval_box(preprocessor, height, width)
    return augment.apply(np.asarray(image), augment.Params(crop=box), (height, width), output, gray=gray)


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """scikit-learn's 'balanced' loss weights, n / (classes · count); 0 for a class with no examples."""
    counts = np.bincount(np.asarray(labels), minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return weights.astype(np.float32)


def model_inputs(images, preprocessor: Preprocessor):
    """uint8 batch → the model's float32 input; call inside the jitted step so normalisation runs on device."""
    import jax.numpy as jnp
    return preprocessor.normalize(jnp.asarray(images))


def _local_batch_size(batch_size: int, process_count: int) -> int:
    if batch_size % process_count:
        raise JaxmedError(f"batch size {batch_size} is not divisible by the {process_count} processes")
    return batch_size // process_count


def _output_size(preprocessor: Preprocessor) -> tuple[int, int]:
    from jaxmed.data.cache import eval_size
    return eval_size(preprocessor)


def _settings(value) -> augment.Settings | None:
    if value is None or isinstance(value, augment.Settings):
        return value
    if not value.get("enabled", True):
        return None
    return augment.Settings.from_config(value)


class _CachedRows:
    """This host's rows of a split, read as batches; re-opens the memmap in each worker process rather than
    pickling gigabytes of pixels into it."""

    def __init__(self, split: Split, rows: np.ndarray):
        self.path, self.rows, self.gray, self.model_ready = split.path, rows, split.grayscale, split.model_ready
        self.labels = split.labels[rows]
        self.sizes = (np.tile(np.asarray(split.images.shape[1:3], np.int32), (len(rows), 1)) if split.model_ready
                      else split.sizes[rows])
        self._images = None if self.path else split.images

    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self.path, mmap_mode="r")
        return self._images

    def batch(self, positions: np.ndarray, mask: np.ndarray, images: np.ndarray) -> dict:
        return {"image": images, "label": self.labels[positions], "index": self.rows[positions], "mask": mask}

    def __getstate__(self):
        state = dict(self.__dict__)
        if self.path:
            state["_images"] = None
        return state


class _EpochOrder:
    """Batch k of an endless stream of epochs, each a fresh order of this host's examples drawn from (seed, epoch):
    a permutation, or with `balanced` as many draws with replacement, weighted 1 / class count (torch's
    WeightedRandomSampler), cut into `batches_per_epoch` batches. Random access by batch number, so grain's
    iterator state (the next batch number) resumes exactly. → (positions, mask): a short last batch is padded
    with the epoch's first examples (as torch's DistributedSampler pads), mask False there."""

    def __init__(self, labels: np.ndarray, batch_size: int, seed: int, balanced: bool, batches_per_epoch: int):
        self.count, self.batch_size, self.seed = len(labels), batch_size, seed
        self.batches_per_epoch = batches_per_epoch
        weights = 1.0 / np.bincount(labels)[labels]
        self.probabilities = weights / weights.sum() if balanced else None
        self._orders = {}  # the few epochs being read

    def __len__(self) -> int:
        return sys.maxsize // self.batch_size

    def __getitem__(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        epoch, slot = divmod(batch, self.batches_per_epoch)
        order = self._order(epoch)
        positions = order[slot * self.batch_size:(slot + 1) * self.batch_size]
        mask = np.arange(self.batch_size) < len(positions)
        if len(positions) < self.batch_size:
            positions = np.concatenate([positions, np.resize(order, self.batch_size - len(positions))])
        return positions, mask

    def _order(self, epoch: int) -> np.ndarray:
        order = self._orders.get(epoch)
        if order is None:
            rng = np.random.default_rng([self.seed, int(epoch)])
            order = (rng.permutation(self.count) if self.probabilities is None
                     else rng.choice(self.count, self.count, p=self.probabilities))
            if len(self._orders) > 4:
                self._orders.clear()
            self._orders[epoch] = order
        return order


class _AugmentedBatch(grain.transforms.RandomMap):
    def __init__(self, cached: _CachedRows, preprocessor: Preprocessor, settings: augment.Settings):
        self.cached, self.settings, self.output = cached, settings, _output_size(preprocessor)

    def random_map(self, element: tuple[np.ndarray, np.ndarray], rng: np.random.Generator) -> dict:
        positions, mask = element
        images, sizes = self.cached.images(), self.cached.sizes[positions]
        batch = np.empty((len(positions), *self.output, 3), np.uint8)
        for slot, params in enumerate(augment.sample_batch(rng, sizes, self.settings)):
            augment.apply(images[self.cached.rows[positions[slot]]], params, tuple(sizes[slot]), self.output,
                          gray=self.cached.gray, out=batch[slot])
        return self.cached.batch(positions, mask, batch)


class _PlainBatch(grain.transforms.Map):
    def __init__(self, cached: _CachedRows, preprocessor: Preprocessor):
        self.cached, self.preprocessor, self.output = cached, preprocessor, _output_size(preprocessor)

    def map(self, element: tuple[np.ndarray, np.ndarray]) -> dict:
        positions, mask = element
        images, sizes = self.cached.images(), self.cached.sizes[positions]
        batch = np.empty((len(positions), *self.output, 3), np.uint8)
        for slot, position in enumerate(positions):
            batch[slot] = eval_view(images[self.cached.rows[position]], sizes[slot], self.preprocessor, self.output,
                                    self.cached.model_ready, gray=self.cached.gray)
        return self.cached.batch(positions, mask, batch)
