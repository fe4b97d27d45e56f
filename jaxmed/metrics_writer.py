"""Where training numbers go: TensorBoard events and metrics.jsonl in the workdir, and a tqdm progress bar."""

from __future__ import annotations

import json
from pathlib import Path

import jax
from tqdm.auto import tqdm


class MetricsWriter:
    """Process 0 writes; the others keep quiet so a multi-host run has one set of files."""

    def __init__(self, workdir):
        self.active = jax.process_index() == 0
        if self.active:
            from tensorboardX import SummaryWriter

            self.tensorboard = SummaryWriter(str(Path(workdir) / "tensorboard"))
            self.jsonl = open(Path(workdir) / "metrics.jsonl", "a")

    def write(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        for key, value in metrics.items():
            self.tensorboard.add_scalar(key, value, step)
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.active:
            self.tensorboard.close()
            self.jsonl.close()


def progress_bar(total: int, start: int):
    """Steps with rate and ETA (tqdm); silent on every host but the first."""
    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, disable=jax.process_index() != 0,
                desc="train")
