"""orbax checkpoints of a run: `W/checkpoints` (latest, to resume: state + grain iterator + metadata) and
`W/best` (the best K by a validation metric: weights + metadata, for evaluation and export)."""

from __future__ import annotations

import logging
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from jaxmed.errors import JaxmedError

log = logging.getLogger("jaxmed.checkpoint")


def workdir_path(workdir) -> epath.Path:
    """A local directory (made absolute: orbax refuses relative paths) or a gs://… URL, as an epath."""
    text = str(workdir)
    return epath.Path(text) if "://" in text else epath.Path(os.path.abspath(os.path.expanduser(text)))


def resolve_best_mode(best_metric: str, best_mode: str = "") -> str:
    """"max" or "min" for `best_metric`: as TrainingArguments sets greater_is_better (transformers 5.23,
    `not metric_for_best_model.endswith("loss")`) when the mode is left empty; a mode that contradicts the metric
    (a loss maximised, a score minimised) is an error, not the worst checkpoint kept."""
    implied = "min" if best_metric.endswith("loss") else "max"
    if not best_mode:
        return implied
    if best_mode not in ("min", "max"):
        raise JaxmedError(f"train.best_mode={best_mode!r}: choose max, min, or leave it empty to follow "
                          f"train.best_metric")
    if best_mode != implied:
        raise JaxmedError(f"train.best_mode={best_mode!r} contradicts train.best_metric={best_metric!r} (a loss is "
                          f"minimised, a score maximised): set train.best_mode={implied!r} or leave it empty")
    return best_mode


def _best_key(best_metric: str, best_mode: str):
    """Sort key of orbax's BestN and best_step() (ascending quality; `reverse` for min): the metric, then the earlier
    step — of equal values the first is best, as the HF Trainer's strict `np.greater`/`np.less` in
    _determine_best_metric keeps it (orbax's stable sort alone would keep the last)."""
    sign = -1 if best_mode == "max" else 1
    return lambda metrics: (metrics[best_metric], sign * metrics.get("step", 0))


class Checkpoints:
    def __init__(self, workdir, *, keep_best: int = 1, best_metric: str = "accuracy", best_mode: str = "",
                 keep_latest: int = 2, async_saves: bool = True):
        root = self.root = workdir_path(workdir)
        self.best_metric = best_metric
        best_mode = self.best_mode = resolve_best_mode(best_metric, best_mode)
        self.latest = ocp.CheckpointManager(
            root / "checkpoints",
            options=ocp.CheckpointManagerOptions(max_to_keep=keep_latest, enable_async_checkpointing=async_saves,
                                                 cleanup_tmp_directories=True,
                                                 multiprocessing_options=_barriers("latest")),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})
        self.best = ocp.CheckpointManager(
            root / "best",
            options=ocp.CheckpointManagerOptions(max_to_keep=keep_best, best_fn=_best_key(best_metric, best_mode),
                                                 best_mode=best_mode, keep_checkpoints_without_metrics=False,
                                                 enable_async_checkpointing=async_saves,
                                                 cleanup_tmp_directories=True,
                                                 multiprocessing_options=_barriers("best")),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    @classmethod
    def for_run(cls, workdir, train_config, *, async_saves: bool = False) -> "Checkpoints":
        """The checkpoints of a run with this `train` config section (best kept by its metric)."""
        return cls(workdir, keep_best=train_config.keep_best, best_metric=train_config.best_metric,
                   best_mode=train_config.best_mode, async_saves=async_saves)

    @classmethod
    def of_run_dir(cls, workdir) -> "Checkpoints":
        """A trained run's checkpoints as its config kept them (W/config.json's best_metric and mode), for readers
        that have no config of their own (export, predict): 'best' must mean what it meant in training."""
        from jaxmed.config import load_run_config

        workdir = workdir_path(workdir)
        if not (workdir / "config.json").exists():  # a bare checkpoint folder: the defaults
            return cls(workdir, async_saves=False)
        return cls.for_run(workdir, load_run_config(workdir).train)

    def save_latest(self, step: int, state, iterator, meta: dict, *, force: bool = False) -> bool:
        saved = self.latest.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator),
            meta=ocp.args.JsonSave(meta)), force=force)
        self.latest.check_for_errors()  # an earlier async save that failed surfaces here, not never
        return saved

    def save_best(self, step: int, weights, meta: dict, metrics: dict) -> None:
        self.best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(weights),
                                                     meta=ocp.args.JsonSave(meta)),
                       metrics={**{k: float(v) for k, v in metrics.items()}, "step": step})
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

    def select(self, which: str = "best") -> tuple[ocp.CheckpointManager, int, str]:
        """`best` (falls back to the latest when nothing was validated), `latest`, or a step number of either."""
        best, latest = self.best.best_step(), self.latest.latest_step()
        if which == "best" and best is not None:
            return self.best, best, f"best/{best}"
        if which in ("best", "latest") and latest is not None:
            if which == "best":
                log.warning("no best checkpoint (no validation ran): using the latest, step %d", latest)
            return self.latest, latest, f"checkpoints/{latest}"
        if str(which).isdigit():
            for manager, folder in ((self.best, "best"), (self.latest, "checkpoints")):
                if int(which) in manager.all_steps():
                    return manager, int(which), f"{folder}/{which}"
        raise JaxmedError(f"no checkpoint {which!r} in {self.root}: best steps {list(self.best.all_steps())}, "
                          f"latest steps {list(self.latest.all_steps())} — has this workdir been trained?")

    def restore_flat_weights(self, which: str = "best") -> tuple[dict[str, np.ndarray], dict, str]:
        """({dotted model path: array}, meta, source) of a checkpoint's parameters and batch statistics, read on
        this host alone from the checkpoint's own metadata — no model, optimizer or device layout needed."""
        manager, step, source = self.select(which)
        on_host = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=on_host),
                              manager.item_metadata(step)["state"])
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                 meta=ocp.args.JsonRestore()))
        flat = {}
        for group in ("params", "stats"):
            for key, value in traverse_util.flatten_dict(dict(restored["state"][group])).items():
                key = key[:-1] if key[-1] == "value" else key  # nnx Variables are saved as {…, "value": array}
                flat[".".join(map(str, key))] = np.asarray(value)
        return flat, restored["meta"], source

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


def _barriers(name: str) -> ocp.options.MultiprocessingOptions:
    """Each manager its own barrier names: both save the step they validate at, asynchronously, and orbax's
    multi-host barrier `_async_write_complete.<step>` is otherwise the same key for both ("already ongoing")."""
    return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)
