"""model.remat: checkpointing each block changes what the backward pass keeps, never the numbers."""

import collections
import contextlib
import io
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from helpers_configs import config_file
from jaxmed.errors import JaxmedError
from jaxmed.train import run as jrun
from jaxmed.train.step import step_function


def two_steps(config, mode: str):
    """Losses and gradient norms of two train steps (dropout on, BatchNorm statistics updating) with `mode`."""
    config.model.remat = mode
    spec = jrun.model_spec(config)
    spec.hf_config.num_labels = 4
    model = jrun.build_model(spec, jnp.float32, config.seed)
    model.train()
    graph, params, stats, rest = jrun._split(model)
    tx = optax.adamw(1e-3)
    step = jax.jit(step_function(graph, rest, tx, lambda images: images.astype(jnp.float32) / 255, seed=0))
    rng = np.random.default_rng(0)
    size = config.model.preprocessor["size"]["height"]
    state = {"params": params, "stats": stats, "opt": tx.init(params), "step": jnp.int32(0)}
    out = []
    for _ in range(2):
        batch = {"image": rng.integers(0, 255, (4, size, size, 3), dtype=np.uint8),
                 "label": rng.integers(0, 4, 4).astype(np.int32)}
        state, metrics = step(state, batch)
        out.append([float(metrics["loss"]), float(metrics["grad_norm"])])
    return np.asarray(out)


@pytest.mark.parametrize("config_path", ["tests/tiny_config.py", "configs/demo.py"])
def test_remat_gives_the_losses_of_no_remat(config_path):
    reference = two_steps(config_file(config_path), "none")
    for mode in ("blocks", "full"):
        np.testing.assert_allclose(two_steps(config_file(config_path), mode), reference, rtol=2e-6, atol=1e-7)


def test_remat_checkpoints_the_blocks():
    """The jaxpr of a training step's gradient holds one checkpoint per encoder layer; none without."""
    def checkpoints(mode):
        config = config_file("tests/tiny_config.py")
        config.model.remat = mode
        model = jrun.build_model(jrun.model_spec(config), jnp.float32, 0)  # training mode: dropout active
        graph, params, rest = nnx.split(model, nnx.Param, ...)
        loss = lambda params, x: nnx.merge(graph, params, rest, copy=True)(x).sum()  # noqa: E731
        text = str(jax.make_jaxpr(jax.grad(loss))(params, jnp.zeros((1, 32, 32, 3))))
        return text.count("remat2[")

    assert checkpoints("none") == 0 and checkpoints("blocks") >= 2 and checkpoints("full") >= 2


def test_an_unknown_remat_is_an_error():
    config = config_file("tests/tiny_config.py")
    config.model.remat = "layers"
    with pytest.raises(JaxmedError, match="model.remat='layers'; choose one of none, blocks, full"):
        jrun.model_spec(config)


def test_remat_eval_step_merges_without_copies():
    """The eval step merges the model without copies inside jit (jaxmed.train.run.make_eval_step): a checkpointed
    block must not mutate its Variables from inside the checkpoint's trace."""
    outputs = {}
    for mode in ("none", "blocks"):
        config = config_file("tests/tiny_config.py")
        config.model.remat = mode
        model = jrun.build_model(jrun.model_spec(config), jnp.float32, 0)
        model.eval()
        graph, params, stats, rest = jrun._split(model)
        logits = jax.jit(lambda p, s, x: nnx.merge(graph, p, s, rest)(x))(params, stats, jnp.ones((2, 32, 32, 3)))
        outputs[mode] = np.asarray(logits)
    np.testing.assert_allclose(outputs["blocks"], outputs["none"], rtol=1e-6, atol=1e-7)


def _saved_residuals(mode: str, dtype: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, shape) of every activation the tiny ViT's backward pass keeps under `mode` (jax's own listing)."""
    config = config_file("tests/tiny_config.py")
    config.model.remat, config.model.dtype = mode, dtype
    config.model.hf_config.update(dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    model = jrun.build_model(jrun.model_spec(config), jnp.dtype(dtype), 0)
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    loss = lambda params: nnx.merge(graph, params, rest, copy=True)(jnp.ones((2, 32, 32, 3))).sum()  # noqa: E731
    listing = io.StringIO()
    with contextlib.redirect_stdout(listing):
        jax.ad_checkpoint.print_saved_residuals(loss, params)  # one "bf16[2,17,48] output of ..." per line
    activations = [line for line in listing.getvalue().splitlines() if "from the argument" not in line]
    return [(kind, tuple(int(d) for d in dims.split(",") if d))
            for kind, dims in (re.match(r"(\S+)\[([\d,]*)\]", line).groups() for line in activations)]


def _bytes(residuals) -> int:
    itemsize = {"f32": 4, "bf16": 2, "i32": 4, "s32": 4, "u32": 4, "bool": 1, "u8": 1, "key<fry>": 8}
    return sum(math.prod(shape) * itemsize[kind] for kind, shape in residuals)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_blocks_keeps_each_attentions_qkv_and_full_keeps_none(dtype):
    """`blocks` keeps exactly each layer's q, k, v (token-major, in the compute dtype) beyond what `full` keeps
    (each block's input); `none` keeps more than both."""
    config = config_file("tests/tiny_config.py").model.hf_config
    qkv = ({"float32": "f32", "bfloat16": "bf16"}[dtype], (2, 17, config.hidden_size))
    none, blocks, full = (_saved_residuals(mode, dtype) for mode in ("none", "blocks", "full"))
    extra = collections.Counter(blocks)
    extra.subtract(full)
    assert +extra == collections.Counter({qkv: 3 * config.num_hidden_layers}) and not -extra, (blocks, full)
    assert _bytes(none) > _bytes(blocks) > _bytes(full), (none, blocks, full)
