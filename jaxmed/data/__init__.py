"""Data: sources → decoded uint8 cache → grain pipeline → augmentation → model preprocessing.

The trainer's API:

    config = jaxmed.data.default_config()            # the `data` ConfigDict (see config.py for every key)
    dataset = jaxmed.data.load_dataset(config, preprocessor)
    dataset.splits["train"|"val"|"test"]            # Split: .images uint8 (N,H,W,3) memmap, .labels int32 (N,),
                                                     #   .ids (file path or source id), .sizes, .model_ready
    dataset.class_names, dataset.skipped, dataset.leakage, dataset.summary()

    iterator = jaxmed.data.train_iterator(dataset.splits["train"], preprocessor, batch_size=B, seed=S,
                                          augment_settings=config.augment, balanced=config.balanced_sampling,
                                          num_workers=config.num_workers, process_index=jax.process_index(),
                                          process_count=jax.process_count())
    batch = next(iterator)          # {"image": uint8 (B/P,H,W,3), "label": int32, "index": int64}, endless
    iterator.get_state() / iterator.set_state(state)   # or grain.checkpoint.CheckpointSave/Restore with orbax
    jaxmed.data.steps_per_epoch(split, B)
    for batch in jaxmed.data.eval_batches(split, preprocessor, batch_size=B, process_index=..., process_count=...):
        ...                         # + "mask": bool, False on the padding of the last batch
    jaxmed.data.model_inputs(batch["image"], preprocessor)   # inside jit: uint8 → normalised float32
    jaxmed.data.class_weights(split.labels, len(dataset.class_names))

Where the pixels come from: val/test are cached as exactly `preprocessor.geometry(decoded file)` — the HF
processor's resize/crop, bit-equal for RGB files (with grayscale=True, of the gray-replicated image) — so eval
never resamples. Train is cached as the whole image squashed to a square of max(cache_size, model input)
pixels; each epoch one fused affine warp (rotation, RandomResizedCrop, flips, translation) resamples it once,
undoing the squash so crops keep the original aspect ratio.
"""

from jaxmed.data.augment import Settings as AugmentSettings
from jaxmed.data.config import default_config
from jaxmed.data.dataset import Dataset, Split, load_dataset
from jaxmed.data.pipeline import (class_weights, eval_batches, host_train_iterator, model_inputs, steps_per_epoch,
                                  train_iterator)
from jaxmed.data.preprocess import Preprocessor

__all__ = ["AugmentSettings", "Dataset", "Preprocessor", "Split", "class_weights", "default_config",
           "eval_batches", "host_train_iterator", "load_dataset", "model_inputs", "steps_per_epoch", "train_iterator"]
