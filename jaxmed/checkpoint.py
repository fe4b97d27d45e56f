"""orbax checkpoints of a run: `W/checkpoints` (latest, to resume: state + grain iterator + metadata) and
`W/best` (the best K by a validation metric: weights + metadata, for evaluation and export)."""

from __future__ import annotations

import logging
import grain
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger("jaxmed.checkpoint")


class Checkpoints:
    def __init__(self, workdir, *, keep_best: int = 1, best_metric: str = "accuracy", best_mode: str = "max",
                 keep_latest: int = 2, async_saves: bool = True):
        root = epath.Path(workdir)
        self.best_metric = best_metric
        self.latest = ocp.CheckpointManager(
            root / "checkpoints",
            options=ocp.CheckpointManagerOptions(max_to_keep=keep_latest, enable_async_checkpointing=async_saves,
                                                 cleanup_tmp_directories=True),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})
        self.best = ocp.CheckpointManager(
            root / "best",
            options=ocp.CheckpointManagerOptions(max_to_keep=keep_best, best_fn=lambda m: m[best_metric],
                                                 best_mode=best_mode, keep_checkpoints_without_metrics=False,
                                                 enable_async_checkpointing=async_saves,
                                                 cleanup_tmp_directories=True),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    def save_latest(self, step: int, state, iterator, meta: dict, *, force: bool = False) -> bool:
        saved = self.latest.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator),
            meta=ocp.args.JsonSave(meta)), force=force)
        self.latest.check_for_errors()  # an earlier async save that failed surfaces here, not never
        return saved

    def save_best(self, step: int, weights, meta: dict, metrics: dict) -> None:
        self.best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(weights),
                                                     meta=ocp.args.JsonSave(meta)),
                       metrics={k: float(v) for k, v in metrics.items()})
        self.best.check_for_errors()

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def restore_meta(self, step: int, manager=None) -> dict:
        manager = manager or self.latest
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore_latest(self, step: int, abstract_state, iterator) -> tuple[dict, dict]:
        """`abstract_state`: ShapeDtypeStructs with today's shardings, so 8-device checkpoints restore on 1."""
        restored = self.latest.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(iterator),
            meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def restore_state(self, step: int, abstract_state) -> dict:
        """The train state of a latest checkpoint alone (no data iterator), e.g. to evaluate it."""
        return self.latest.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))["state"]

    def best_step(self) -> int | None:
        return self.best.best_step()

    def restore_weights(self, step: int, abstract_weights):
        return self.best.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_weights)))["state"]

    def reached_preemption(self, step: int) -> bool:
        return self.latest.reached_preemption(step)

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()
        self.latest.check_for_errors()
        self.best.check_for_errors()

    def close(self) -> None:
        self.wait()
        self.latest.close()
        self.best.close()
