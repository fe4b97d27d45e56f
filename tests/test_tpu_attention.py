"""TPU attention (`kernels.tpu_attention`): jaxmed's token-major Pallas kernel (`models/pallas_attention.py`) and
Pallas's splash attention for long sequences, checked on this CPU in Pallas's interpret mode — the kernel code
libtpu compiles, run step by step — against PyTorch's attention and HF models, inside `shard_map` over a two-device
batch mesh as the train step runs it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import test_cvt
import test_vit
from helpers_models import check_train_step
from hf_utils import assert_grads_close, images, nhwc, save_hf, torch_grads
from jaxmed.convert import TABLES, from_pretrained
from jaxmed.convert.core import to_hf
from jaxmed.models import kernels, layers, pallas_attention
from jaxmed.train import mesh as jmesh

RNG = np.random.RandomState(0)


@pytest.fixture
def mesh():
    return jmesh.make_mesh(data=2)  # the first two of the 8 simulated devices


@pytest.fixture
def tpu_kernels():
    with kernels.force_kernels("tpu"):  # Pallas kernels in interpret mode
        yield


def _sharded(fn, mesh, *specs):
    """`fn` jitted with its arguments laid out on `mesh` by `specs`, traced under `kernels.batch_mesh` as the
    train and eval steps are."""
    def traced(*args):
        with kernels.batch_mesh(mesh):
            return fn(*args)

    return jax.jit(traced, in_shardings=tuple(NamedSharding(mesh, spec) for spec in specs))


def _torch_attention(q, k, v, scale):
    q, k, v = (torch.tensor(np.asarray(t, np.float32), requires_grad=True) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    return out, (q, k, v)


@pytest.fixture(params=["tokens", "splash"])
def kernel(request, monkeypatch):
    """Which TPU kernel runs: the token-major one (every shape here fits it) or splash (forced, as for sequences
    too long for the token-major one)."""
    if request.param == "splash":
        monkeypatch.setattr(pallas_attention, "MAX_SCORES", 0)
    return request.param


@pytest.mark.usefixtures("tpu_kernels")
@pytest.mark.parametrize("shape", [(3, 17, 17, 8), (3, 50, 13, 16), (3, 130, 6, 8), (4, 17, 9, 64)],
                         ids=["vit", "cvt-keys", "two-blocks", "two-head-groups"])
def test_tpu_attention_matches_torch_values_and_gradients(mesh, shape, kernel):
    heads, queries, keys, head_dim = shape
    q, k, v = (jnp.asarray(RNG.randn(4, heads, n, head_dim), jnp.float32) for n in (queries, keys, keys))
    w = jnp.asarray(RNG.randn(4, heads, queries, head_dim), jnp.float32)
    scale = head_dim**-0.5

    def loss(q, k, v):
        context, weights = layers.attention(q, k, v, scale, need_weights=False)
        assert weights is None
        return jnp.sum(context * w), context

    batch = P(("data", "fsdp"))
    step = _sharded(jax.value_and_grad(loss, (0, 1, 2), has_aux=True), mesh, batch, batch, batch)
    (_, context), grads = step(q, k, v)
    jaxpr = str(jax.make_jaxpr(lambda *a: _in_mesh(mesh, loss, *a))(q, k, v))
    assert "pallas_call" in jaxpr and "shard_map" in jaxpr
    assert ("splash" in jaxpr) == (kernel == "splash")

    ref, leaves = _torch_attention(q, k, v, scale)
    (ref * torch.from_numpy(np.array(w))).sum().backward()
    assert np.abs(np.asarray(context) - ref.detach().numpy()).max() <= 2e-6
    for ours, theirs in zip(grads, leaves, strict=True):
        assert np.abs(np.asarray(ours) - theirs.grad.numpy()).max() <= 1e-5


def test_token_major_blocks_take_128_lanes_of_heads_or_the_whole_width():
    assert pallas_attention.heads_per_block(12, 64) == 2  # ViT-B/16: 768 = 6 blocks of two heads
    assert pallas_attention.heads_per_block(4, 32) == 4
    assert pallas_attention.heads_per_block(3, 64) == 3  # CvT-13 stage 2: 192 lanes, no 128-lane split
    assert pallas_attention.heads_per_block(1, 64) == 1
    shaped = lambda heads, tokens, head_dim, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(  # noqa: E731
        (8, heads, tokens, head_dim), dtype)
    assert pallas_attention.supported(shaped(12, 197, 64), shaped(12, 197, 64))  # ViT-B/16
    assert pallas_attention.supported(shaped(3, 784, 64), shaped(3, 196, 64))  # CvT-13 stage 2
    assert not pallas_attention.supported(shaped(1, 3136, 64), shaped(1, 784, 64))  # CvT-13 stage 1: splash
    assert not pallas_attention.supported(shaped(16, 257, 80), shaped(16, 257, 80))  # 1280 lanes a step: splash


def _in_mesh(mesh, fn, *args):
    with kernels.batch_mesh(mesh):
        return fn(*args)


@pytest.mark.usefixtures("tpu_kernels")
def test_bf16_tpu_attention_is_close_to_fp32_and_returns_the_cpu_kernels_dtype(mesh, kernel):
    q, k, v = (jnp.asarray(RNG.randn(2, 2, 17, 8), jnp.float32) for _ in range(3))
    attend = lambda *a: layers.attention(*a, 0.3, need_weights=False)[0]  # noqa: E731
    spec = P(("data", "fsdp"))
    low = _sharded(attend, mesh, spec, spec, spec)(*(t.astype(jnp.bfloat16) for t in (q, k, v)))
    ref, _ = _torch_attention(q, k, v, 0.3)
    assert low.dtype == jnp.float32  # the CPU kernel's fp32 context, as on every backend
    assert np.abs(np.asarray(low) - ref.detach().numpy()).max() <= 0.02 * float(ref.detach().abs().max())


@pytest.mark.usefixtures("tpu_kernels")
def test_without_a_batch_mesh_or_with_an_indivisible_batch_tpus_use_xla_attention(mesh):
    """predict and the explanations trace no mesh: the Mosaic call cannot be partitioned there, so XLA's
    attention runs; so it does when the batch does not split over the mesh."""
    q = jnp.ones((3, 2, 17, 8))
    attend = lambda *a: layers.attention(*a, 0.3, need_weights=False)[0]  # noqa: E731
    assert "pallas_call" not in str(jax.make_jaxpr(attend)(q, q, q))
    assert "pallas_call" not in str(jax.make_jaxpr(lambda *a: _in_mesh(mesh, attend, *a))(q, q, q))
    assert "pallas_call" in str(jax.make_jaxpr(lambda *a: _in_mesh(mesh, attend, *a))(q[:2], q[:2], q[:2]))


def _sharded_train_step(model, pixels, labels):
    """helpers_models.train_step, jitted with the batch split over two devices and traced under their batch mesh
    (as jaxmed's train step): the TPU kernels' Pallas attention runs per device inside shard_map."""
    mesh = jmesh.make_mesh(data=2)
    graph, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, rest, pixels, labels):
        module = nnx.merge(graph, params, rest, copy=True)
        logits = module(pixels)
        value = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
        return value, (logits, nnx.state(module, nnx.Not(nnx.Param)))

    batch = P(("data", "fsdp"))
    step = _sharded(jax.value_and_grad(loss, has_aux=True), mesh, P(), P(), batch, batch)
    assert "pallas_call" in str(jax.make_jaxpr(lambda *a: _in_mesh(mesh, loss, *a))(params, rest, pixels, labels))
    (value, (logits, rest)), grads = step(params, rest, pixels, labels)
    nnx.update(model, rest)  # BatchNorm statistics, as nnx.value_and_grad updates them in place
    return value, logits, grads


@pytest.mark.usefixtures("tpu_kernels")
def test_vit_parity_with_the_tpu_kernels(tmp_path, kernel):
    """ViT (transformers 5 renames its modules in memory: gradients are compared by checkpoint key, as in
    test_backend_kernels)."""
    hf, ours = test_vit._hf(tmp_path, **test_vit.SMALL)
    x, labels = images(4, 32, seed=1), np.array([0, 1, 2, 4])
    ref_loss, ref_grads = torch_grads(hf.train(), x=x, labels=labels, directory=tmp_path / "hf")
    with torch.no_grad():
        ref_logits = hf(torch.from_numpy(x)).logits.numpy()
    ours.train()
    loss, logits, grads = _sharded_train_step(ours, nhwc(x), jnp.asarray(labels))
    flat = {".".join(map(str, key)): np.asarray(value[...]) for key, value in grads.flat_state()}
    result = assert_grads_close(to_hf(flat, TABLES["vit"][0]), ref_grads)
    assert abs(float(loss) - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss))
    assert np.abs(np.asarray(logits) - ref_logits).max() <= 1e-4
    print("tpu kernels vs HF: vit", kernel, result, float(np.abs(np.asarray(logits) - ref_logits).max()))


@pytest.mark.usefixtures("tpu_kernels")
@pytest.mark.parametrize("config", ["cls-avg", "no-cls"])
def test_cvt_parity_with_the_tpu_kernels(tmp_path, config, kernel):
    """CvT: more queries than keys (strided key/value projections), a cls token in the last stage or none."""
    hf = test_cvt._hf_model(test_cvt.CONFIGS[config])
    ours = from_pretrained(save_hf(hf, tmp_path / "hf"))
    result = check_train_step(hf, ours, images(4, test_cvt.SIZE, seed=1), np.array([0, 1, 2, 2]),
                              forward=test_cvt._torch_forward, step=_sharded_train_step)
    print("tpu kernels vs HF: cvt", config, kernel, result)
