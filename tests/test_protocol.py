"""The HF Trainer's protocol, item by item, on tiny inputs (no training): warmup rounding, best-checkpoint ties,
the direction of a loss metric, steps per epoch with the last partial batch, train.steps over phases, and the
validation loss. Each pins what transformers 5.23 does (read in trainer.py / training_args.py / trainer_callback.py).
"""

import math

import numpy as np
import pytest
import torch
from transformers import TrainingArguments
from transformers.optimization import get_linear_schedule_with_warmup

from jaxmed.config import base_config
from jaxmed.train import optim


def test_warmup_rounds_up_as_the_hf_trainer():
    """TrainingArguments.get_warmup_steps: math.ceil(total · ratio); 50 updates at 0.05 warm up for 3 (round: 2)."""
    total, ratio, lr = 50, 0.05, 1e-3
    args = TrainingArguments(output_dir="/tmp/unused", warmup_steps=ratio, report_to=[], use_cpu=True)
    warmup = args.get_warmup_steps(total)
    assert warmup == 3
    config = base_config().optim
    config.warmup_ratio = ratio
    ours = optim.schedule(config, lr, total)
    parameter = torch.nn.Parameter(torch.zeros(1))
    reference = get_linear_schedule_with_warmup(torch.optim.SGD([parameter], lr=lr), warmup, total)
    for update in range(total):
        assert abs(float(ours(update)) - reference.get_last_lr()[0]) <= 1e-6 * lr, update  # optax computes in float32
        reference.optimizer.step()
        reference.step()


def _hf_reference(values: list[float], metric: str, patience: int = 0, greater_is_better=None):
    """(best step, step at which training stops or None) of one HF Trainer validated at steps 1, 2, …, computed by
    transformers' own Trainer._determine_best_metric and EarlyStoppingCallback, in the Trainer's order (the
    callback's on_evaluate runs inside evaluate(), before the best metric is updated)."""
    from types import SimpleNamespace

    from transformers import EarlyStoppingCallback, Trainer, TrainerControl, TrainerState

    args = TrainingArguments(output_dir="/tmp/unused", metric_for_best_model=metric, eval_strategy="steps",
                             greater_is_better=greater_is_better, report_to=[], use_cpu=True)
    trainer = SimpleNamespace(args=args, state=TrainerState())
    callback, control = EarlyStoppingCallback(early_stopping_patience=max(patience, 1)), TrainerControl()
    for step, value in enumerate(values, 1):
        trainer.state.global_step = step
        metrics = {f"eval_{metric}": value}
        callback.on_evaluate(args, trainer.state, control, metrics)
        Trainer._determine_best_metric(trainer, metrics, None)
        if patience and control.should_training_stop:
            return trainer.state.best_global_step, step
    return trainer.state.best_global_step, None


def _best_step(tmp_path, values: dict[int, float], metric: str, mode: str | None = None, keep: int = 1):
    import jax.numpy as jnp

    from jaxmed.train.checkpoint import Checkpoints

    chosen = {} if mode is None else {"best_mode": mode}  # None: Checkpoints' default
    checkpoints = Checkpoints(tmp_path, keep_best=keep, best_metric=metric, async_saves=False, **chosen)
    for step, value in values.items():
        checkpoints.save_best(step, {"w": jnp.zeros(2)}, {"step": step}, {metric: value})
    kept = sorted(checkpoints.best.all_steps())
    best = checkpoints.best_step()
    checkpoints.close()
    return best, kept


@pytest.mark.parametrize("metric,values", [
    ("accuracy", [0.80, 0.90, 0.90, 0.85]),  # the example: HF keeps step 2
    ("recall/PNEUMONIA", [1.0, 1.0, 0.5]),
    ("loss", [0.9, 0.5, 0.5, 0.7]),
])
def test_best_checkpoint_is_the_first_of_equals(tmp_path, metric, values):
    hf_best, _ = _hf_reference(values, metric)
    best, _ = _best_step(tmp_path, dict(enumerate(values, 1)), metric, "min" if metric == "loss" else "max")
    assert best == hf_best


def test_keep_best_two_keeps_the_two_first_best(tmp_path):
    best, kept = _best_step(tmp_path, {1: 0.9, 2: 0.9, 3: 0.9, 4: 0.5}, "accuracy", "max", keep=2)
    assert best == 1 and kept == [1, 2]


def test_a_loss_metric_is_minimised_unless_set_and_a_contradiction_is_an_error(tmp_path):
    """TrainingArguments: greater_is_better = not metric_for_best_model.endswith("loss"); val losses .9, .5, .3."""
    hf_best, _ = _hf_reference([0.9, 0.5, 0.3], "loss")
    assert _best_step(tmp_path / "a", {1: 0.9, 2: 0.5, 3: 0.3}, "loss")[0] == hf_best == 3

    from jaxmed.errors import JaxmedError
    from jaxmed.train.checkpoint import resolve_best_mode

    assert resolve_best_mode("accuracy") == "max" and resolve_best_mode("loss", "min") == "min"
    for metric, mode in [("loss", "max"), ("accuracy", "min")]:
        with pytest.raises(JaxmedError, match=f"train.best_mode='{mode}' contradicts train.best_metric='{metric}'"):
            resolve_best_mode(metric, mode)
    assert base_config().train.best_mode == ""


@pytest.mark.parametrize("mode,metric,values", [
    ("max", "accuracy", [0.5, 0.6, 0.6, 0.6, 0.7]),  # equal values count against the patience
    ("max", "accuracy", [0.5, 0.4, 0.6, 0.6, 0.55, 0.6]),
    ("min", "loss", [1.0, 0.8, 0.9, 0.8, 0.7, 0.75, 0.75]),
])
@pytest.mark.parametrize("patience", [1, 2, 3])
def test_early_stopping_counts_as_the_hf_callback(mode, metric, values, patience):
    from jaxmed.train.stopping import EarlyStopping

    stopping = EarlyStopping(patience, mode)
    ours = next((step for step, value in enumerate(values, 1) if stopping.update(value)), None)
    assert ours == _hf_reference(values, metric, patience)[1]


def test_early_stopping_state_survives_json_and_each_phase_starts_afresh():
    import json

    from jaxmed.train.stopping import EarlyStopping

    stopping = EarlyStopping(2, "max")
    stopping.update(0.5), stopping.update(0.5)
    restored = EarlyStopping.from_json(json.loads(json.dumps(stopping.to_json())), 2, "max", 0)
    assert restored == stopping and restored.update(0.5)  # the second stale validation stops, as uninterrupted
    assert restored.for_phase(0) is restored
    assert restored.for_phase(1) == EarlyStopping(2, "max", 1)  # no best, no count, not stopped


def test_validation_loss_is_the_trained_objective():
    """HF's eval_loss goes through compute_loss (label_smoother included); class weights as training has them."""
    import jax.numpy as jnp

    from jaxmed.train import validation_metrics

    rng = np.random.RandomState(0)
    logits, labels = rng.randn(12, 3).astype(np.float32), rng.randint(0, 3, 12)
    weights = np.array([0.5, 2.0, 1.0], np.float32)
    ours = validation_metrics(labels, logits, ["a", "b", "c"], label_smoothing=0.1,
                              class_weights=jnp.asarray(weights))["loss"]
    reference = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels),
                                                  label_smoothing=0.1, weight=torch.from_numpy(weights))
    assert abs(ours - float(reference)) <= 1e-6


@pytest.mark.parametrize("count,batch,shards", [(40, 16, 1), (41, 8, 2), (9, 16, 1)])
def test_an_epoch_is_ceil_batches_the_last_partial_and_masked(count, batch, shards):
    """torch's DataLoader (HF dataloader_drop_last=False): 40 images at batch 16 are 3 batches, not 2; each
    epoch shows every image once, the padding of its last batch masked out."""
    from test_data_pipeline import AUGMENT, VIT, memory_split

    from jaxmed.data import host_train_iterator, steps_per_epoch

    split = memory_split(count)
    per_epoch = math.ceil(math.ceil(count / shards) / (batch // shards))  # the fullest shard's batches
    if shards == 1:
        assert steps_per_epoch(split, batch) == per_epoch
    iterators = [host_train_iterator(split, VIT, batch_size=batch, shards=shards, process_index=host,
                                     process_count=shards, seed=1, augment_settings=AUGMENT)
                 for host in range(shards)]
    for epoch in range(2):
        seen = []
        for _ in range(per_epoch):
            for iterator in iterators:
                batch_ = next(iterator)
                mask = batch_.get("mask", np.ones(batch // shards, bool))
                assert batch_["image"].shape[0] == batch // shards and mask.dtype == bool
                seen += batch_["index"][mask].tolist()
        assert sorted(seen) == list(range(count)), epoch


def test_drop_last_drops_each_epochs_partial_batch():
    from test_data_pipeline import AUGMENT, VIT, memory_split

    from jaxmed.data import steps_per_epoch, train_iterator

    split = memory_split(40)
    assert steps_per_epoch(split, 16, drop_last=True) == 2
    iterator = train_iterator(split, VIT, batch_size=16, seed=1, augment_settings=AUGMENT, drop_last=True)
    epochs = [np.concatenate([next(iterator)["index"] for _ in range(2)]) for _ in range(2)]
    assert all(len(set(indices.tolist())) == 32 for indices in epochs)  # full batches, 8 left out each epoch
    assert set(epochs[0].tolist()) != set(epochs[1].tolist())  # a fresh permutation, not the leftovers first


def _train_config(**values):
    config = base_config().train
    config.update(values)
    return config


def test_train_steps_are_shared_over_the_phases_by_their_epochs():
    """Kermany: head 5 epochs, all 8; train.steps=20 gives both phases, 8 and 12 updates (was: head only, 20)."""
    from jaxmed.errors import JaxmedError
    from jaxmed.train.optim import Phase
    from jaxmed.train.run import training_budget

    def updates(phase, steps_per_epoch):  # what setup makes of a phase's epochs
        return math.ceil(round(phase.epochs * steps_per_epoch, 6))

    plan = [Phase("head", 5, 1e-3, ("classifier",)), Phase("all", 8, 1e-4)]
    for steps_per_epoch in (3, 7, 100):
        shared, budget = training_budget(plan, steps_per_epoch, _train_config(steps=20))
        assert [updates(phase, steps_per_epoch) for phase in shared] == [8, 12], steps_per_epoch
        assert [phase.lr for phase in shared] == [1e-3, 1e-4] and "head 8, all 12" in budget
    uneven = [Phase("a", 0.01, 1.0), Phase("b", 10, 1.0), Phase("c", 0.01, 1.0)]
    assert [updates(p, 4) for p in training_budget(uneven, 4, _train_config(steps=5))[0]] == [1, 3, 1]
    with pytest.raises(JaxmedError, match=r"train.steps=1 is fewer than the 2 phases \(head, all\)"):
        training_budget(plan, 3, _train_config(steps=1))


def test_epochs_give_ceil_updates_per_epoch_and_per_phase():
    """HF: num_update_steps_per_epoch = ceil(batches / accumulation), max_steps = ceil(epochs · that)."""
    from jaxmed.train.optim import Phase
    from jaxmed.train.run import training_budget

    def budget(epochs, steps_per_epoch):
        return training_budget([Phase("a", epochs, 1.0)], steps_per_epoch, _train_config(batch_size=16))[1]

    assert budget(2.5, 5) == "2.5 epochs of 5 steps (batch 16) = 13 steps"  # 12.5 → 13 (round() gave 12)
    assert budget(8 / 3, 3).endswith("= 8 steps")  # not 9 from 8.000000000000002
    assert budget(0.1, 7).endswith("= 1 steps")


def test_readers_without_a_config_pick_the_best_checkpoint_the_run_kept(tmp_path):
    """export and predict open a run by its directory alone: 'best' must follow W/config.json's metric (here the
    lowest loss, step 2), not the default accuracy (which would pick step 1)."""
    import jax.numpy as jnp

    from jaxmed.train.checkpoint import Checkpoints

    config = base_config()
    config.train.best_metric, config.train.keep_best = "loss", 2
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    training = Checkpoints.for_run(tmp_path, config.train)
    for step, (loss, accuracy) in {1: (0.9, 0.95), 2: (0.3, 0.90)}.items():
        training.save_best(step, {"w": jnp.zeros(2)}, {"step": step}, {"loss": loss, "accuracy": accuracy})
    training.close()
    reader = Checkpoints.of_run_dir(tmp_path)
    assert reader.select("best")[2] == "best/2"
    reader.close()
