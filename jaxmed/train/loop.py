"""The training loop, top to bottom: set-up → state (fresh or resumed) → jitted steps → validation, best and latest
checkpoints, preemption → the run's result. Evaluation on test follows in jaxmed.experiment.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed import data as jdata
from jaxmed.errors import JaxmedError
from jaxmed.train import mesh as jmesh
from jaxmed.train.checkpoint import Checkpoints, workdir_path
from jaxmed.train.metrics_writer import MetricsWriter, progress_bar
from jaxmed.train.run import (Run, abstract_state, init_state, make_eval_step, optimizer, phase_index, predict, setup,
                              with_optimizer)
from jaxmed.train.step import cross_entropy, make_train_step
from jaxmed.train.stopping import EarlyStopping

log = logging.getLogger("jaxmed.train")


def validation_metrics(labels: np.ndarray, logits: np.ndarray, class_names: list[str], *,
                       label_smoothing: float = 0.0, class_weights=None) -> dict:
    """What the best checkpoint can be chosen by: accuracy, loss, balanced accuracy, F1, recall/<class>.

    The loss is the trained objective (label smoothing, class weights), as the HF Trainer's eval_loss goes through
    the same compute_loss (and label_smoother) as training: "best by loss" means best by what was minimised."""
    from sklearn.metrics import balanced_accuracy_score, f1_score, recall_score

    predictions = logits.argmax(-1)
    loss = float(cross_entropy(jnp.asarray(logits), jnp.asarray(labels), smoothing=label_smoothing,
                               class_weights=class_weights))
    return {"accuracy": float(np.mean(predictions == labels)), "loss": loss,
            "balanced_accuracy": float(balanced_accuracy_score(labels, predictions)),
            "f1_macro": float(f1_score(labels, predictions, average="macro", zero_division=0)),
            "f1_weighted": float(f1_score(labels, predictions, average="weighted", zero_division=0)),
            **{f"recall/{name}": float(value) for name, value in zip(class_names, recall_score(
                labels, predictions, labels=list(range(len(class_names))), average=None, zero_division=0))}}


class _Preemption:
    """SIGTERM (spot VM reclaimed, scheduler eviction) or Ctrl-C (SIGINT) → save at the next step and exit cleanly;
    a second Ctrl-C aborts at once (the last complete checkpoint stays)."""

    def __init__(self):
        self.requested = None  # the signal's name once one arrived
        self._previous = {}

    def __enter__(self):
        if jax.process_count() == 1:  # multi-host: jax.distributed's preemption notifier + orbax sync instead
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested == "SIGINT" and signum == signal.SIGINT:
            print("\nsecond Ctrl-C: aborted without saving; rerunning resumes from the last saved step",
                  file=sys.stderr, flush=True)
            os._exit(130)
        self.requested = signal.Signals(signum).name
        if signum == signal.SIGINT:
            print("\nCtrl-C: saving at the current step (Ctrl-C again aborts without saving)", file=sys.stderr,
                  flush=True)

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def train(config, workdir, run: Run | None = None) -> dict:
    """Train (resuming from W/checkpoints when present) and keep the best checkpoints by validation.

    → {"steps", "history", "run", "eval_step"}, or {"preempted_at": step} after a SIGTERM (saved; rerun resumes).
    """
    workdir = workdir_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    run = run or setup(config, workdir)
    tc = config.train
    if jax.process_index() == 0:
        (workdir / "splits.csv").write_text(run.dataset.splits_csv())
    checkpoints = Checkpoints.for_run(workdir, tc, async_saves=tc.async_checkpoints)  # checks best_metric/mode
    train_split = run.dataset.splits["train"]
    val_split = run.dataset.splits.get("val")
    if val_split is not None and tc.best_metric not in validation_metrics(
            val_split.labels[:2], np.zeros((2, len(run.dataset.class_names))), run.dataset.class_names):
        raise JaxmedError(f"train.best_metric={tc.best_metric!r} is not a validation metric; choose accuracy, loss, "
                          f"balanced_accuracy, f1_macro, f1_weighted or recall/<class> with a class of "
                          f"{run.dataset.class_names}")
    iterator = jdata.host_train_iterator(
        train_split, run.preprocessor, batch_size=tc.batch_size, shards=config.data.shards or jax.process_count(),
        process_index=jax.process_index(), process_count=jax.process_count(), seed=config.seed,
        augment_settings=config.data.augment, balanced=config.data.balanced_sampling,
        num_workers=config.data.num_workers, drop_last=tc.drop_last)
    class_weights = (jnp.asarray(jdata.class_weights(train_split.labels, len(run.dataset.class_names)))
                     if tc.class_weighted_loss else None)
    meta = {"class_names": run.dataset.class_names, "model_type": run.spec.hf_config.model_type,
            "hf_config": run.spec.hf_config.to_dict(), "preprocessor": run.spec.preprocessor,
            "config": json.loads(config.to_json_best_effort())}
    start, saved = checkpoints.latest_step(), {}
    if start is not None:
        # the phase that wrote the checkpoint: one saved at a phase's last step holds that phase's optimizer state
        # (the loop then starts the next phase's fresh optimizer)
        phase = phase_index(run, max(start - 1, 0))
        state, saved = checkpoints.restore_latest(start, abstract_state(run, phase), iterator)
        log.info("resuming from step %d (%s/checkpoints/%d)", start, workdir, start)
    else:
        phase, start = 0, 0
        state = init_state(run, phase)
    # HF saves EarlyStoppingCallback's counter and state.best_metric with each checkpoint: so do we (in its meta)
    stopping = EarlyStopping.from_json(saved.get("early_stopping"), tc.early_stopping_patience,
                                       checkpoints.best_mode, phase)
    history = list(saved.get("history", []))
    total = run.phase_steps[-1]
    writer = MetricsWriter(workdir, config)
    tx, lr = optimizer(run, phase, state["params"])
    train_step = make_train_step(run, tx, class_weights, run.phases[phase])
    eval_step = make_eval_step(run)
    eval_every = tc.eval_every_steps or run.steps_per_epoch
    log.info("training budget: %s", run.budget)
    accumulation = tc.grad_accumulation
    log.info("a step is one optimizer update of %d micro-batch%s of %d images (train.steps, eval_every_steps, "
             "log_every_steps, min_steps and the checkpoints count these updates, as HF's max_steps)",
             accumulation, "es" if accumulation > 1 else "", tc.batch_size)
    sharding = jmesh.batch_sharding(run.mesh)
    bar = progress_bar(total, start)
    step, started, pending = start, time.perf_counter(), []
    session = (start, started)

    def progress(step: int) -> dict:  # the metadata of a latest checkpoint: what a resumed run continues from
        return dict(meta, step=step, early_stopping=stopping.to_json(), history=history)

    last_step = step
    if stopping.stopped:  # the checkpoint was saved where early stopping ended its phase
        log.info("early stopping had ended phase %s at step %d (no better %s for %d validations); %s",
                 run.phases[stopping.phase].name, step, tc.best_metric, stopping.stale,
                 "nothing left to train" if stopping.phase == len(run.phases) - 1 else "going on with the next phase")
        step = total if stopping.phase == len(run.phases) - 1 else run.phase_steps[stopping.phase]
    with _Preemption() as preemption:
        while step < total:
            if phase_index(run, step) != phase:  # a new phase starts a fresh optimizer, as a new HF Trainer
                if pending:  # log the last phase's steps under its own objective and learning rate
                    _flush(run, writer, bar, pending, step, started, lr, phase, checkpoints, state, iterator,
                           progress(step))
                    started, pending = time.perf_counter(), []
                phase = phase_index(run, step)
                stopping = stopping.for_phase(phase)  # and its own patience and best-so-far (a new Trainer's)
                log.info("phase %s from step %d", run.phases[phase].name, step)
                state = with_optimizer(run, phase, state["params"], state["stats"], step * accumulation)
                tx, lr = optimizer(run, phase, state["params"])
                train_step = make_train_step(run, tx, class_weights, run.phases[phase])
            for _ in range(accumulation):  # one optimizer update (optax.MultiSteps applies it on the last)
                batch = next(iterator)
                batch = jmesh.global_batch({key: batch[key] for key in ("image", "label", "mask")}, sharding)
                state, metrics = train_step(state, batch)
                pending.append(metrics)
            step += 1
            last_step = step
            if step % tc.log_every_steps == 0 or step == total:
                _flush(run, writer, bar, pending, step, started, lr, phase, checkpoints, state, iterator,
                       progress(step))
                started, pending = time.perf_counter(), []
            # counted from the phase's start, as a new HF Trainer per phase evaluates; per epoch also at the phase's
            # end (HF's on_epoch_end evaluates a last, partial epoch), and always at the end of the run
            phase_start, phase_end = run.phase_steps[phase - 1] if phase else 0, run.phase_steps[phase]
            if val_split is not None and ((step - phase_start) % eval_every == 0 or step == total
                                          or (step == phase_end and not tc.eval_every_steps)):
                indices, logits = predict(run, eval_step, state["params"], state["stats"], val_split)
                metrics = validation_metrics(val_split.labels[indices], logits, run.dataset.class_names,
                                             label_smoothing=tc.label_smoothing, class_weights=class_weights)
                writer.write(step, {f"val/{k}": v for k, v in metrics.items()})
                history.append({"step": step, **metrics})
                bar.write(f"step {step}: val " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                                         if not k.startswith("recall/")))
                # W/best: one best over the whole run (HF's state.best_metric over a training), first of equals;
                # early stopping: per phase. In a reconstruction (pretraining) phase the head is untrained: its
                # metrics choose no checkpoint and stop nothing.
                if run.phases[phase].objective == "classification":
                    checkpoints.save_best(step, {"params": state["params"], "stats": state["stats"]},
                                          dict(meta, step=step, val=metrics), metrics)
                    if stopping.update(metrics[tc.best_metric]):
                        last = phase == len(run.phases) - 1
                        log.info("early stopping at step %d: no better %s for %d validations; %s", step,
                                 tc.best_metric, stopping.stale, "the run ends" if last else
                                 f"phase {run.phases[phase].name} ends, phase {run.phases[phase + 1].name} starts")
                        if pending:
                            _flush(run, writer, bar, pending, step, started, lr, phase, checkpoints, state, iterator,
                                   progress(step))
                            started, pending = time.perf_counter(), []
                        checkpoints.save_latest(step, state, iterator, progress(step), force=True)
                        if last:
                            break
                        bar.update(run.phase_steps[phase] - step)
                        step = run.phase_steps[phase]  # the next phase starts at its first step, as it would have
                        continue
            if step % run.steps_per_epoch == 0 or step == total:
                checkpoints.save_latest(step, state, iterator, progress(step))
            if preemption.requested or (jax.process_count() > 1 and checkpoints.reached_preemption(step)):
                if checkpoints.latest_step() != step:  # a signal at an epoch's end: that step is saved already
                    checkpoints.save_latest(step, state, iterator, progress(step), force=True)
                checkpoints.close()
                bar.close()
                writer.close()  # trackers flushed and finished: the resumed run continues them
                _write_summary(run, session, step)
                print(f"{'interrupted' if preemption.requested == 'SIGINT' else 'preempted'} at step {step}: saved "
                      f"{workdir}/checkpoints/{step}; run the same command again to resume", flush=True)
                return {"preempted_at": step, **({"signal": "SIGINT"} if preemption.requested == "SIGINT" else {})}
    bar.close()
    checkpoints.close()
    writer.close()
    _write_summary(run, session, last_step)
    return {"steps": last_step, "history": history, "run": run, "eval_step": eval_step}


def _write_summary(run: Run, session: tuple[int, float], step: int) -> None:
    """W/train_summary.json: parameters, training seconds (summed over resumed sessions) and images per second, for
    comparisons of runs (jaxmed.compare)."""
    if jax.process_index() != 0:
        return
    path = run.workdir / "train_summary.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    seconds = time.perf_counter() - session[1]
    images = (step - session[0]) * run.config.train.batch_size * run.config.train.grad_accumulation
    summary = {"parameters": int(sum(leaf.size for leaf in jax.tree.leaves(run.abstract["params"]))),
               "steps": step, "train_seconds": previous.get("train_seconds", 0.0) + seconds,
               "images_per_second": images / seconds if images else previous.get("images_per_second")}
    path.write_text(json.dumps(summary, indent=1) + "\n")


def _flush(run, writer, bar, pending, step, started, lr, phase, checkpoints, state, iterator, meta):
    values = jax.device_get(pending)
    losses = np.array([v["loss"] for v in values])
    if not np.all(np.isfinite(losses)):
        bad = step - len(values) + int(np.argmin(np.isfinite(losses)))
        checkpoints.save_latest(step, state, iterator, dict(meta, nonfinite_at=bad), force=True)
        checkpoints.close()
        raise JaxmedError(f"loss became {losses[~np.isfinite(losses)][0]} at step {bad + 1}; saved step {step} in "
                          f"{run.workdir}/checkpoints for inspection — lower optim.lr or enable optim.clip_norm")
    images_per_second = len(values) * run.config.train.batch_size / max(time.perf_counter() - started, 1e-9)
    accumulation = run.config.train.grad_accumulation
    current_lr = float(lr(max(0, step - (run.phase_steps[phase - 1] if phase else 0) - 1)))
    # a reconstruction phase's loss is an MSE: its own curve, not a stretch of the cross-entropy's
    loss_name = "train/loss" if run.phases[phase].objective == "classification" else "train/reconstruction_loss"
    summary = {loss_name: float(losses.mean()), "train/grad_norm": float(np.mean([v["grad_norm"] for v in values])),
               "train/lr": current_lr, "train/images_per_second": images_per_second,
               "train/epoch": step / run.steps_per_epoch,
               "train/micro_batches": step * accumulation}  # `step` counts optimizer updates; this, batches
    if "accuracy" in values[0]:
        summary["train/accuracy"] = float(np.mean([v["accuracy"] for v in values]))
    writer.write(step, summary)
    bar.update(len(values) // accumulation)
    bar.set_postfix(loss=f"{summary[loss_name]:.4f}", lr=f"{current_lr:.2e}", img_s=f"{images_per_second:.1f}")
