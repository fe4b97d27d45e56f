"""Where training numbers go: TensorBoard events and metrics.jsonl in the workdir, and a tqdm progress bar."""

from __future__ import annotations

import json

import jax
from etils import epath
from tqdm.auto import tqdm


class MetricsWriter:
    """Process 0 writes; the others keep quiet so a multi-host run has one set of files.

    A local metrics.jsonl is appended to; an object store (gs://…) has no append, so there the file is rewritten
    whole, keeping what an earlier (resumed) run wrote.
    """

    def __init__(self, workdir, *, append: bool | None = None):
        self.active = jax.process_index() == 0
        if self.active:
            from tensorboardX import SummaryWriter

            workdir = epath.Path(workdir)
            self.tensorboard = SummaryWriter(str(workdir / "tensorboard"))
            self.path = workdir / "metrics.jsonl"
            self.remote = "://" in str(workdir) if append is None else not append
            if self.remote:
                self.lines = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
            else:
                self.jsonl = open(self.path, "a")

    def write(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        for key, value in metrics.items():
            self.tensorboard.add_scalar(key, value, step)
        line = json.dumps({"step": step, **metrics}) + "\n"
        if self.remote:
            self.lines.append(line)
            self.path.write_text("".join(self.lines))
        else:
            self.jsonl.write(line)
            self.jsonl.flush()

    def close(self) -> None:
        if self.active:
            self.tensorboard.close()
            if not self.remote:
                self.jsonl.close()


def progress_bar(total: int, start: int):
    """Steps with rate and ETA (tqdm); silent on every host but the first."""
    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, disable=jax.process_index() != 0,
                desc="train")
