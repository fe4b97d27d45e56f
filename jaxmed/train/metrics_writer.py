"""Where training numbers go: metrics.jsonl in the workdir, the trackers of `train.trackers` (TensorBoard by default;
Weights & Biases, MLflow: trackers.py) at the same steps, and a tqdm progress bar."""

from __future__ import annotations

import json

import jax
from etils import epath
from tqdm.auto import tqdm

from jaxmed.config import base_config
from jaxmed.train import trackers


class MetricsWriter:
    """Process 0 writes; the others keep quiet so a multi-host run has one set of files.

    A local metrics.jsonl is appended to; an object store (gs://…) has no append, so there the file is rewritten
    whole, keeping what an earlier (resumed) run wrote.
    """

    def __init__(self, workdir, config=None, *, append: bool | None = None):
        self.active = jax.process_index() == 0
        if self.active:
            workdir = epath.Path(workdir)
            # the experiment's tracker session (trackers.session) when there is one, so evaluation logs to it too
            self.trackers, self.owns_trackers = trackers.for_run(workdir, config if config is not None
                                                                 else base_config())
            self.path = workdir / "metrics.jsonl"
            self.remote = "://" in str(workdir) if append is None else not append
            if self.remote:
                self.lines = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
            else:
                self.jsonl = open(self.path, "a")

    def write(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        self.trackers.log(step, metrics)
        line = json.dumps({"step": step, **metrics}) + "\n"
        if self.remote:
            self.lines.append(line)
            self.path.write_text("".join(self.lines))
        else:
            self.jsonl.write(line)
            self.jsonl.flush()

    def close(self) -> None:
        if self.active:
            if self.owns_trackers:
                self.trackers.close()
            if not self.remote:
                self.jsonl.close()


def progress_bar(total: int, start: int):
    """Steps with rate and ETA (tqdm); silent on every host but the first."""
    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, disable=jax.process_index() != 0,
                desc="train")
