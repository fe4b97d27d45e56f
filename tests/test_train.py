"""Trainer: the loss, HF Trainer parity, the same numbers on 1 and 8 devices, errors for people."""

import json
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch
from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

import tiny_config
from jaxmed import data as jdata
from jaxmed import experiment, train
from jaxmed.convert import TABLES
from jaxmed.errors import JaxmedError


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def _config(cache_dir, **train_overrides):
    config = tiny_config.get_config()
    config.data.cache_dir = cache_dir
    config.train.evaluate_test = False
    config.train.async_checkpoints = False
    for key, value in train_overrides.items():
        section, _, name = key.partition("__")
        config[section][name] = value
    return config


def _losses(workdir) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


def test_cross_entropy_matches_torch():
    rng = np.random.RandomState(0)
    logits, labels = rng.randn(6, 4).astype(np.float32), rng.randint(0, 4, 6)
    weights = np.array([0.5, 2.0, 1.0, 3.0], np.float32)
    for smoothing, class_weights in [(0.0, None), (0.1, None), (0.0, weights), (0.2, weights)]:
        ours = train.cross_entropy(logits, labels, smoothing=smoothing,
                                   class_weights=None if class_weights is None else jax.numpy.asarray(class_weights))
        reference = torch.nn.functional.cross_entropy(
            torch.from_numpy(logits), torch.from_numpy(labels), label_smoothing=smoothing,
            weight=None if class_weights is None else torch.from_numpy(class_weights))
        assert abs(float(ours) - float(reference)) <= 1e-6, (smoothing, class_weights is not None)


def test_decay_mask_equals_hf_trainer(tmp_path):
    from flax import nnx
    from jaxmed.train import optim
    from jaxmed.models import ViT

    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                       image_size=32, patch_size=8, num_labels=3)
    hf_names = set(Trainer.get_decay_parameter_names(None, ViTForImageClassification(config)))
    model = ViT(config, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    mask = optim.decay_mask(params, "vit", optim.layernorm_paths(model))
    flat = jax.tree_util.tree_leaves_with_path(mask)
    table = TABLES["vit"][0]
    ours = {table.hf_key(optim.dotted(path))[0] for path, decays in flat if decays}
    # transformers names parameters in memory like vit.layers.0.attention.q_proj: compare by role, not spelling
    assert len(ours) == len(hf_names)
    assert {n.rsplit(".", 1)[-1] for n in ours} == {"weight", "cls_token", "position_embeddings"}
    assert not any("layernorm" in n or n.endswith("bias") for n in ours)


def test_one_and_eight_devices_give_the_same_losses(tmp_path, cache_dir):
    assert jax.device_count() == 8
    results = {}
    for name, (data, fsdp) in {"1": (1, 1), "data8": (8, 1), "data4_fsdp2": (4, 2)}.items():
        config = _config(cache_dir, train__steps=6, mesh__data=data, mesh__fsdp=fsdp)
        experiment.train_and_evaluate(config, tmp_path / name)
        results[name] = _losses(tmp_path / name)
    assert len(results["1"]) == 6
    for name in ("data8", "data4_fsdp2"):
        for step, loss in results["1"].items():
            assert abs(results[name][step] - loss) <= 1e-5, (name, step)


def test_same_seed_same_numbers(tmp_path, cache_dir):
    for name in ("a", "b"):
        experiment.train_and_evaluate(_config(cache_dir, train__steps=4), tmp_path / name)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")


def test_nonfinite_loss_stops_naming_the_step(tmp_path, cache_dir):
    config = _config(cache_dir, train__steps=6, optim__lr=1e12, optim__clip_norm=0.0, optim__name="sgd")
    with pytest.raises(JaxmedError, match=r"loss became .* at step \d+"):
        experiment.train_and_evaluate(config, tmp_path / "run")
    assert any((tmp_path / "run/checkpoints").iterdir())


def test_bad_model_name_is_a_clear_error(tmp_path, cache_dir):
    config = _config(cache_dir)
    config.model.name = "bert"
    with pytest.raises(JaxmedError, match="not a jaxmed model"):
        experiment.train_and_evaluate(config, tmp_path / "run")


def _checkpoint_params(workdir, step):
    import orbax.checkpoint as ocp
    from flax import traverse_util

    restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    # nnx Variables are saved as {"value": array}: drop that last level
    return {".".join(k[:-1] if k[-1] == "value" else k): np.asarray(v)
            for k, v in traverse_util.flatten_dict(restored["params"]).items()}


def _hf_dir(tmp_path):
    torch.manual_seed(0)
    hf_config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, num_labels=4, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)
    ViTForImageClassification(hf_config).save_pretrained(str(tmp_path / "hf"))
    (tmp_path / "hf/preprocessor_config.json").write_text(json.dumps(
        dict(TABLES["vit"][1], size={"height": 32, "width": 32})))
    return str(tmp_path / "hf")


def test_phases_train_the_head_first_then_everything(tmp_path, cache_dir):
    from jaxmed.convert import from_pretrained

    config = _config(cache_dir, train__steps=0, train__eval_every_steps=0)
    config.model.init_from = _hf_dir(tmp_path)
    config.model.preprocessor = {}
    config.train.phases = [dict(name="head", epochs=1, lr=1e-2, trainable=("classifier",)),
                           dict(name="all", epochs=1, lr=1e-3, trainable=())]
    config.train.keep_best = 1
    experiment.train_and_evaluate(config, tmp_path / "run")
    steps = sorted(int(p.name) for p in (tmp_path / "run/checkpoints").iterdir() if p.name.isdigit())
    end_of_head, end = steps[-2], steps[-1]
    initial = from_pretrained(config.model.init_from)
    patch = "vit.embeddings.patch_embeddings.projection.kernel"
    first, last = _checkpoint_params(tmp_path / "run", end_of_head), _checkpoint_params(tmp_path / "run", end)
    np.testing.assert_array_equal(first[patch], np.asarray(initial.vit.embeddings.patch_embeddings.projection.kernel.value))
    assert np.abs(first["classifier.kernel"] - np.asarray(initial.classifier.kernel.value)).max() > 1e-4
    assert np.abs(last[patch] - first[patch]).max() > 1e-6  # phase 2 trains the backbone


def test_gradient_accumulation_equals_the_large_batch(tmp_path, cache_dir):
    """Two micro-batches of 4 accumulate to exactly the update of one batch of 8 (dropout off, no BatchNorm), and
    train.steps counts optimizer updates, as HF's max_steps: 3 steps are 3 updates either way (were 1.5)."""
    def run(name, batch_size, accumulation, steps):
        config = _config(cache_dir, train__steps=steps, train__batch_size=batch_size,
                         train__grad_accumulation=accumulation, train__eval_every_steps=100, mesh__data=4)
        config.model.hf_config.hidden_dropout_prob = 0.0
        config.model.hf_config.attention_probs_dropout_prob = 0.0
        config.data.augment.enabled = False
        experiment.train_and_evaluate(config, tmp_path / name)
        return _checkpoint_params(tmp_path / name, steps)

    large, accumulated = run("large", 8, 1, 3), run("accumulated", 4, 2, 3)
    # atol: the attention key bias has a mathematically zero gradient, so it holds only Adam-amplified rounding
    # noise (~1e-6) that differs with the summation order
    for key in large:
        np.testing.assert_allclose(accumulated[key], large[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_bf16_compute_keeps_fp32_weights(tmp_path, cache_dir):
    config = _config(cache_dir, train__steps=3, train__eval_every_steps=100)
    config.model.dtype = "bfloat16"
    experiment.train_and_evaluate(config, tmp_path / "run")
    assert all(np.isfinite(v) for v in _losses(tmp_path / "run").values())
    assert all(v.dtype == np.float32 for v in _checkpoint_params(tmp_path / "run", 3).values())


def test_early_stopping_ends_the_run_after_patience_evaluations(tmp_path, cache_dir, caplog):
    """lr 0: validation never improves after the first evaluation, so patience 2 stops at the third; running the
    same command again finds the run stopped (HF saves the callback's state) and trains nothing more."""
    config = _config(cache_dir, train__steps=40, train__eval_every_steps=2, train__early_stopping_patience=2,
                     optim__lr=0.0)
    result = experiment.train_and_evaluate(config, tmp_path / "run")
    assert result["steps"] == 6 and [h["step"] for h in result["history"]] == [2, 4, 6]
    assert (tmp_path / "run/checkpoints/6").exists()  # the stopping point is saved
    metrics = (tmp_path / "run/metrics.jsonl").read_text()
    with caplog.at_level("INFO", logger="jaxmed.train"):
        again = experiment.train_and_evaluate(config, tmp_path / "run")
    assert again["steps"] == 6 and again["history"] == result["history"]
    assert (tmp_path / "run/metrics.jsonl").read_text() == metrics
    assert "early stopping had ended phase train at step 6" in caplog.text and "nothing left to train" in caplog.text


def _hf_phase(model, trainable: str, lr: float, updates: int, output_dir):
    """A fresh HF Trainer's optimizer and schedule for one phase, as the notebooks freeze layers: requires_grad."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad = not trainable or name.startswith(trainable)
    args = TrainingArguments(output_dir=str(output_dir), learning_rate=lr, weight_decay=0.01, max_grad_norm=1.0,
                             lr_scheduler_type="linear", report_to=[], use_cpu=True, metric_for_best_model="accuracy")
    trainer = Trainer(model=model, args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=updates)
    return trainer


def test_losses_match_hf_trainers_over_two_phases_early_stopping_and_a_resume(tmp_path, cache_dir, monkeypatch):
    """Same random-init HF ViT, same batches, AdamW + linear schedule + clipping as transformers.Trainer builds
    them, dropout off — and Kermany's protocol in miniature, one HF Trainer per phase (head only, then everything),
    validated every 2 steps with EarlyStoppingCallback(patience 1), SIGTERM in phase 1 between two validations,
    then resumed. train.steps=16 gives each phase 8 updates; phase 1 stops early and phase 2 still trains; the
    per-step losses (the epoch's last, partial batch included) equal torch's, and the stopping steps and the best
    checkpoint (one best over the run, first of equals) are the ones transformers' own callback and
    _determine_best_metric pick."""
    import signal

    from transformers import EarlyStoppingCallback, TrainerControl, TrainerState

    from jaxmed.train.checkpoint import Checkpoints
    from jaxmed.train.metrics_writer import MetricsWriter

    hf_dir = _hf_dir(tmp_path)
    config = _config(cache_dir, train__steps=16, train__eval_every_steps=2, train__early_stopping_patience=1,
                     optim__weight_decay=0.01, optim__clip_norm=1.0, optim__schedule="linear", mesh__data=1)
    config.model.init_from, config.model.preprocessor = hf_dir, {}
    config.data.augment.enabled = False
    config.train.phases = [dict(name="head", epochs=1, lr=1e-6, trainable=("classifier",)),
                           dict(name="all", epochs=1, lr=1e-3, trainable=())]
    write = MetricsWriter.write

    def sigterm_at_step_3(self, step, metrics):
        write(self, step, metrics)
        if step == 3 and "train/loss" in metrics:
            signal.raise_signal(signal.SIGTERM)  # as a spot VM's reclaim: the loop saves step 3 and returns

    monkeypatch.setattr(MetricsWriter, "write", sigterm_at_step_3)
    assert experiment.train_and_evaluate(config, tmp_path / "run") == {"preempted_at": 3}
    monkeypatch.setattr(MetricsWriter, "write", write)
    result = experiment.train_and_evaluate(config, tmp_path / "run")
    ours = _losses(tmp_path / "run")
    checkpoints = Checkpoints.for_run(tmp_path / "run", config.train)
    our_best = checkpoints.best_step()
    checkpoints.close()

    from jaxmed.data import pipeline

    reference = ViTForImageClassification.from_pretrained(hf_dir)
    preprocessor = jdata.Preprocessor.from_pretrained(hf_dir)
    dataset = jdata.load_dataset(config.data, preprocessor)
    batches = jdata.train_iterator(dataset.splits["train"], preprocessor, batch_size=8, seed=config.seed,
                                   augment_settings=config.data.augment)
    val = list(pipeline.eval_batches(dataset.splits["val"], preprocessor, batch_size=16))

    def pixels(images):
        return torch.from_numpy(preprocessor.normalize(images).transpose(0, 3, 1, 2).copy())

    def val_accuracy():
        reference.eval()
        with torch.no_grad():
            correct = sum(int((reference(pixels(b["image"][b["mask"]])).logits.argmax(-1).numpy()
                               == b["label"][b["mask"]]).sum()) for b in val)
        reference.train()
        return correct / len(dataset.splits["val"])

    run_state = TrainerState()  # one best over the run: W/best
    theirs, evaluations, partial = {}, [], False
    for index, (trainable, lr) in enumerate([("classifier", 1e-6), ("", 1e-3)]):
        trainer = _hf_phase(reference, trainable, lr, 8, tmp_path / "trainer")
        phase_state, callback, control = TrainerState(), EarlyStoppingCallback(1), TrainerControl()
        for local in range(1, 9):
            step = 8 * index + local
            batch = next(batches)
            mask = batch.get("mask", np.ones(len(batch["label"]), bool))
            partial |= not mask.all()
            loss = torch.nn.functional.cross_entropy(reference(pixels(batch["image"][mask])).logits,
                                                     torch.from_numpy(batch["label"][mask]).long())
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in reference.parameters() if p.requires_grad], 1.0)
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
            trainer.optimizer.zero_grad()
            theirs[step] = loss.item()
            if local % 2 == 0:
                metrics = {"eval_accuracy": val_accuracy()}
                evaluations.append((step, metrics["eval_accuracy"]))
                callback.on_evaluate(trainer.args, phase_state, control, metrics)
                for state in (phase_state, run_state):
                    state.global_step = step
                    Trainer._determine_best_metric(SimpleNamespace(args=trainer.args, state=state), metrics, None)
                if control.should_training_stop:
                    break
        if index == 0:
            assert step < 8, "phase 1 should stop early in this set-up"
    assert partial  # an epoch's last batch (51 images at 8: 3 of 8 real) was among them
    assert [(h["step"], h["accuracy"]) for h in result["history"]] == evaluations
    assert sorted(ours) == sorted(theirs) and any(step > 8 for step in ours)  # both phases trained
    for step, loss in theirs.items():
        assert abs(ours[step] - loss) <= 1e-4 * abs(loss), (step, ours[step], loss)
    assert our_best == run_state.best_global_step
