"""Stacked autoencoder: greedy layer-wise phases train only their layer, the head phase only the head; its HF-style
directory round-trips and opens in PyTorch; errors for people."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from flax import nnx, traverse_util

import tiny_config
from jaxmed import data as jdata
from jaxmed import experiment, protocols, train
from jaxmed.train import loop, optim
from jaxmed.train.checkpoint import Checkpoints
from jaxmed.convert import TABLES, from_pretrained, hub, save_pretrained
from jaxmed.convert.core import to_hf
from jaxmed.errors import JaxmedError
from jaxmed.models import SAE, SAEConfig

TABLE = TABLES["jaxmed_sae"][0]
HIDDEN = [32, 16]



class _KeepTenLatest(Checkpoints):
    """Every latest checkpoint of a short run stays, so the test can read each phase's."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "keep_latest": 10})

def _config(cache_dir):
    config = tiny_config.get_config()
    config.data.cache_dir = cache_dir
    config.train.async_checkpoints = False
    config.train.evaluate_test = False
    config.train.steps = 0
    config.train.eval_every_steps = 0  # every epoch = every phase end here
    config.mesh.data = 1  # sharding is tested elsewhere; one device saves orbax a compile per shard
    config.model.name = "jaxmed_sae"
    config.model.hf_config = dict(image_size=32, hidden_sizes=HIDDEN, dropout=0.1)
    protocols.greedy_layerwise(config, len(HIDDEN), epochs=1, lr=1e-2, classifier_epochs=1, classifier_lr=1e-2)
    return config


def _flat(tree) -> dict[str, np.ndarray]:
    return {".".join(str(part) for part in key): np.asarray(value)
            for key, value in traverse_util.flatten_dict(nnx.to_pure_dict(tree)).items()}


def _checkpoint_params(workdir, step) -> dict[str, np.ndarray]:
    restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    # nnx Variables are saved as {"value": array}: drop that last level
    return {".".join(k[:-1] if k[-1] == "value" else k): np.asarray(v)
            for k, v in traverse_util.flatten_dict(restored["params"]).items()}


def _model(trained, params) -> SAE:
    model = nnx.clone(trained["model"])  # building one anew compiles its initialisers again: seconds
    hub.load_weights(model, to_hf(params, TABLE))
    model.eval()
    return model


def _changed(before, after) -> set[str]:
    assert before.keys() == after.keys()
    return {key for key in before if not np.array_equal(before[key], after[key])}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    """One greedy run (autoencoder0, autoencoder1, classifier; one epoch each) keeping every epoch's checkpoint."""
    workdir = tmp_path_factory.mktemp("sae") / "run"
    config = _config(cache_dir)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "Checkpoints", _KeepTenLatest)
        result = experiment.train_and_evaluate(config, workdir)
    run = train.setup(config, workdir)
    model = train.build_model(run.spec, jnp.float32, config.seed)  # the run's init (same seed, same bits)
    params = [hub.flat_weights(model)] + [_checkpoint_params(workdir, end) for end in run.phase_steps]
    batches = jdata.eval_batches(run.dataset.splits["val"], run.preprocessor, batch_size=16)
    pixels = run.preprocessor.normalize(np.concatenate([b["image"][b["index"] >= 0] for b in batches]))
    return dict(workdir=workdir, run=run, result=result, params=params, pixels=pixels, model=model)


def _layer(k):
    return {f"{part}.{k}.{leaf}" for part in ("encoders", "decoders") for leaf in ("kernel", "bias")}


@pytest.mark.parametrize("layer", range(len(HIDDEN)))
def test_reconstruction_phase_trains_only_its_layer(trained, layer):
    before, after = trained["params"][layer], trained["params"][layer + 1]
    assert _changed(before, after) == _layer(layer)  # every other tensor bit-identical, weight decay included


@pytest.mark.parametrize("layer", range(len(HIDDEN)))
def test_reconstruction_loss_decreases_over_its_phase(trained, layer):
    run, pixels = trained["run"], trained["pixels"]
    before = float(_model(trained, trained["params"][layer]).reconstruction_loss(pixels, layer))
    after = float(_model(trained, trained["params"][layer + 1]).reconstruction_loss(pixels, layer))
    assert after < 0.95 * before, (before, after)
    rows = [json.loads(line) for line in (trained["workdir"] / "metrics.jsonl").read_text().splitlines()]
    start, end = ([0] + run.phase_steps)[layer], run.phase_steps[layer]
    logged = [row for row in rows if start < row["step"] <= end and any(k.startswith("train/") for k in row)]
    # the MSE has its own curve: no cross-entropy or accuracy is logged for a reconstruction phase
    assert len(logged) == end - start and all("train/reconstruction_loss" in row for row in logged)
    assert not any("train/loss" in row or "train/accuracy" in row for row in logged)


def test_classifier_phase_trains_only_the_head_and_alone_picks_the_best(trained):
    before, after = trained["params"][-2], trained["params"][-1]
    assert _changed(before, after) == {"classifier.kernel", "classifier.bias"}
    run = trained["run"]
    best = sorted(int(p.name) for p in (trained["workdir"] / "best").iterdir() if p.name.isdigit())
    assert best and all(step > run.phase_steps[-2] for step in best)  # no untrained-head checkpoint is "best"
    assert [h["step"] for h in trained["result"]["history"]] == run.phase_steps  # still validated every epoch


def test_resume_at_a_phase_boundary_matches_the_uninterrupted_run(trained, tmp_path, cache_dir):
    """A checkpoint written at a phase's last step holds that phase's optimizer; resuming starts the next phase's."""
    boundary, end = trained["run"].phase_steps[0], trained["run"].phase_steps[-1]
    shutil.copytree(trained["workdir"] / "checkpoints" / str(boundary), tmp_path / "run/checkpoints" / str(boundary))
    experiment.train_and_evaluate(_config(cache_dir), tmp_path / "run")
    assert not _changed(trained["params"][-1], _checkpoint_params(tmp_path / "run", end))


def test_save_and_load_round_trip_and_pytorch_layout(trained, tmp_path):
    run = trained["run"]
    model = _model(trained, trained["params"][-1])
    out = save_pretrained(model, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "jaxmed_sae" and config["architectures"] == ["SAEForImageClassification"]
    assert config["hidden_sizes"] == HIDDEN and config["id2label"]["0"] == run.dataset.class_names[0]
    assert json.loads((out / "preprocessor_config.json").read_text())["image_processor_type"] == "ViTImageProcessor"

    reloaded = from_pretrained(out)  # offline (conftest), through SAEConfig: no AutoConfig, no hub
    original, again = hub.flat_weights(model), hub.flat_weights(reloaded)
    assert original.keys() == again.keys() and not _changed(original, again)
    pixels = trained["pixels"]
    np.testing.assert_array_equal(np.asarray(model(pixels)), np.asarray(reloaded(pixels)))
    with pytest.raises(ValueError, match="jaxmed_sae"):  # the documented limit: transformers cannot open it
        __import__("transformers").AutoConfig.from_pretrained(str(out))

    # a PyTorch user rebuilds it from the keys: nn.Linear layers take the weights as saved
    from safetensors.torch import load_file

    state = load_file(str(out / "model.safetensors"))
    assert tuple(state["encoders.0.weight"].shape) == (HIDDEN[0], 32 * 32)
    encoders = torch.nn.ModuleList(torch.nn.Linear(*state[f"encoders.{k}.weight"].shape[::-1]) for k in range(2))
    decoders = torch.nn.ModuleList(torch.nn.Linear(*state[f"decoders.{k}.weight"].shape[::-1]) for k in range(2))
    torch_model = torch.nn.ModuleDict(dict(encoders=encoders, decoders=decoders,
                                           classifier=torch.nn.Linear(HIDDEN[-1], len(run.dataset.class_names))))
    torch_model.load_state_dict(state)
    x = torch.from_numpy(np.asarray(pixels)).mean(-1).flatten(1)
    with torch.no_grad():
        for encoder in encoders:
            x = torch.sigmoid(encoder(x))
        logits = torch_model["classifier"](x).numpy()
    np.testing.assert_allclose(np.asarray(model(pixels)), logits, atol=1e-5)


def _abstract_sae(**config):  # shapes only: enough for masks and input checks, and no compilation
    return nnx.eval_shape(lambda: SAE(SAEConfig(**config), rngs=nnx.Rngs(0)))


def test_decay_mask_spares_biases():
    model = _abstract_sae(image_size=4, hidden_sizes=[3], num_labels=2)
    mask = optim.decay_mask(nnx.state(model, nnx.Param), "jaxmed_sae", optim.layernorm_paths(model))
    assert {k: bool(v) for k, v in _flat(mask).items()} == {
        "encoders.0.kernel": True, "encoders.0.bias": False, "decoders.0.kernel": True, "decoders.0.bias": False,
        "classifier.kernel": True, "classifier.bias": False}


def test_weights_that_do_not_fit_the_config_name_the_key(trained, tmp_path):
    save_pretrained(trained["model"], tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, hidden_sizes=[HIDDEN[0], 8])))
    # keys are checked in order, so the first misfit named is the classifier's input width
    with pytest.raises(JaxmedError, match=r"shape mismatch for classifier\.weight: the model expects \(4, 8\) "
                                          r"\(HF layout\), the checkpoint has \(4, 16\)"):
        from_pretrained(tmp_path)


def test_bad_config_and_input_errors(tmp_path, cache_dir):
    with pytest.raises(JaxmedError, match="hidden_act='tanh'"):
        SAEConfig(hidden_act="tanh")
    with pytest.raises(JaxmedError, match="hidden_sizes"):
        SAEConfig(hidden_sizes=[])
    model = _abstract_sae(image_size=4, hidden_sizes=[3], num_labels=2)
    with pytest.raises(JaxmedError, match="image_size=4"):
        model(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(JaxmedError, match=r"reconstruction layer 1: the SAE has encoders 0\.\.0"):
        model.reconstruction_loss(np.zeros((1, 4, 4, 3), np.float32), 1)

    for bad, message in [(dict(objective="reconstruction"), "needs `layer`"), (dict(objective="denoise"), "objective"),
                         (dict(layers=0), "unknown key")]:
        config = _config(cache_dir)
        config.train.phases = [dict(name="p", epochs=1, lr=1e-3, **bad)]
        with pytest.raises(JaxmedError, match=message):
            optim.phases(config)

    # the trainer refuses before training anything: a layer the SAE lacks, a model without a reconstruction loss
    config = _config(cache_dir)
    config.train.phases = [*config.train.phases[:2], dict(name="ae2", epochs=1, lr=1e-3, objective="reconstruction",
                                                          layer=len(HIDDEN))]
    with pytest.raises(JaxmedError, match=r"phase ae2 pretrains layer 2, but the jaxmed_sae model has layers 0\.\.1"):
        experiment.train_and_evaluate(config, tmp_path / "sae")
    config = tiny_config.get_config()  # a ViT has nothing to reconstruct
    config.data.cache_dir = cache_dir
    config.train.steps = 0
    config.train.phases = [dict(name="ae", epochs=1, lr=1e-3, objective="reconstruction", layer=0)]
    with pytest.raises(JaxmedError, match="no reconstruction loss"):
        experiment.train_and_evaluate(config, tmp_path / "vit")
    assert not (tmp_path / "sae/checkpoints").exists()
