"""Early stopping as the HF Trainer's EarlyStoppingCallback (threshold 0), one phase at a time, saved with each
checkpoint so that a resumed run stops where the uninterrupted one does."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class EarlyStopping:
    """Patience and best-so-far of the current phase. A phase is a new Trainer in the reference notebooks (Kermany:
    head only, then everything), so each phase starts with no best and a zero counter, and stopping ends only it.

    `patience` 0 never stops (the counter still runs, for the log).
    """

    patience: int
    mode: str  # "max" | "min" (checkpoint.resolve_best_mode)
    phase: int = 0
    best: float | None = None
    stale: int = 0  # validations since the last strictly better one (EarlyStoppingCallback's patience counter)
    stopped: bool = False  # early stopping ended this phase

    def for_phase(self, phase: int) -> "EarlyStopping":
        """This state, or a fresh one when `phase` is a new phase."""
        if phase == self.phase:
            return self
        return EarlyStopping(self.patience, self.mode, phase)

    def update(self, value: float) -> bool:
        """One validation's value of the metric → True when the phase should stop. Improvement is strict, as
        check_metric_value's np.greater / np.less: an equal value counts against the patience."""
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        self.best, self.stale = (float(value), 0) if better else (self.best, self.stale + 1)
        self.stopped = bool(self.patience) and self.stale >= self.patience
        return self.stopped

    def to_json(self) -> dict:
        return {"phase": self.phase, "best": self.best, "stale": self.stale, "stopped": self.stopped}

    @classmethod
    def from_json(cls, saved: dict | None, patience: int, mode: str, phase: int) -> "EarlyStopping":
        """The state saved with a checkpoint (None: a checkpoint from before it was saved: a fresh state)."""
        if not saved:
            return cls(patience, mode, phase)
        return cls(patience, mode, int(saved["phase"]), saved["best"], int(saved["stale"]), bool(saved["stopped"]))
