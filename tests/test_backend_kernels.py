"""Per-backend kernels (`kernels.per_backend`): the choice follows the platform the arrays are compiled for, the forced
accelerator kernels (grouped/plain convolutions, no fences, `jax.nn.dot_product_attention`) agree with the CPU
rewrites layer by layer, and every model keeps HF parity with them (eval logits, train-mode gradients) on CPU.

The accelerator kernels run here through XLA:CPU — attention through dot_product_attention's XLA implementation,
as cuDNN cannot run on a CPU — which checks their layouts (BTNH), scales and gradients; each parity test also reads
the lowered program to prove the forced kernels, not the CPU ones, were the ones measured.
"""

from __future__ import annotations

import copy
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import test_cvt
import test_efficientnet
import test_resnet
import test_vit
from helpers_models import check_train_step, max_diff
from helpers_models import save_hf as save_plain
from hf_utils import assert_grads_close, images, jax_grads, nhwc, torch_grads, torch_logits
from jaxmed.convert import from_pretrained
from jaxmed.models import kernels, layers
from test_lowering import (XLA_ATTENTION_MARKERS, data_dependent_cases, fence_predicates, group_counts, ops_from,
                           xla_attention_ops)

RNG = np.random.RandomState(0)


def _array(*shape, dtype=jnp.float32):
    return jnp.asarray(RNG.randn(*shape), dtype)


# --- the choice ---------------------------------------------------------------------------------------------------

def _pick(x):
    """per_backend with kernels that tell which one ran: sin on CPU, tanh elsewhere (cos on CUDA)."""
    return kernels.per_backend(x, cpu=jnp.sin, accelerator=jnp.tanh, cuda=jnp.cos)


def test_the_choice_follows_the_platform_and_the_override():
    x = _array(8)
    np.testing.assert_array_equal(_pick(x), jnp.sin(x))  # concrete CPU arrays
    jitted = jax.jit(_pick)
    np.testing.assert_allclose(jitted(x), jnp.sin(x), rtol=1e-6)  # traced for the CPU devices they live on
    assert set(re.findall(r"\bstablehlo\.(sine|cosine|tanh)\b", jitted.lower(x).as_text())) == {"sine"}
    with kernels.force_kernels("accelerator"):
        assert kernels.forced_kernels() == "accelerator"
        np.testing.assert_array_equal(_pick(x), jnp.tanh(x))
        # the function traced above is traced again, not reused from jax's cache with the CPU kernel
        np.testing.assert_allclose(jitted(x), jnp.tanh(x), rtol=1e-6)
        with kernels.force_kernels("cpu"):
            np.testing.assert_allclose(jitted(x), jnp.sin(x), rtol=1e-6)
    assert kernels.forced_kernels() is None
    np.testing.assert_allclose(jitted(x), jnp.sin(x), rtol=1e-6)
    spec = jax.ShapeDtypeStruct((8,), jnp.float32)
    for platform, op in [("cuda", "cosine"), ("tpu", "tanh"), ("cpu", "sine")]:
        text = jax.export.export(jitted, platforms=[platform])(spec).mlir_module()
        assert set(re.findall(r"\bstablehlo\.(sine|cosine|tanh)\b", text)) == {op}, platform
    with pytest.raises(ValueError, match="kind must be one of"):
        with kernels.force_kernels("gpu"):
            pass


def test_accelerator_outputs_take_the_cpu_kernels_dtypes():
    x = _array(4, dtype=jnp.bfloat16)
    cpu = lambda v: v.astype(jnp.float32) * 2  # noqa: E731
    with kernels.force_kernels("accelerator"):
        out = kernels.per_backend(x, cpu=cpu, accelerator=lambda v: v * 2)
    assert out.dtype == jnp.float32
    assert jax.jit(lambda v: kernels.per_backend(v, cpu=cpu, accelerator=lambda w: w * 2))(x).dtype == jnp.float32


# --- layer by layer: forced accelerator vs CPU, fp32 -------------------------------------------------------------

def _both(fn, *args):
    """fn's value and gradients (w.r.t. every argument) under the CPU kernels and under the accelerator kernels."""
    results = {}
    for kind in kernels.KERNELS:
        with kernels.force_kernels(kind):
            value, grads = jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(args)))))(*args)
            results[kind] = (value, grads, jax.jit(fn).lower(*args).as_text())
    return results


def _assert_agree(results, tol=1e-5):
    (v_cpu, g_cpu, _), (v_acc, g_acc, _) = results["cpu"], results["accelerator"]
    # a sum of O(1) terms that may nearly cancel (its inputs come from the module's RNG, whose state depends on
    # which tests ran before on this xdist worker): held to `tol` absolutely as well as relatively
    np.testing.assert_allclose(v_acc, v_cpu, rtol=tol, atol=tol)
    leaves_cpu, leaves_acc = jax.tree.leaves(g_cpu), jax.tree.leaves(g_acc)
    assert len(leaves_cpu) == len(leaves_acc)
    for a, c in zip(leaves_acc, leaves_cpu):
        scale = float(np.abs(np.asarray(c)).max())
        assert max_diff(a, c) <= tol * scale, (max_diff(a, c), scale)


def _both_on_module(module, x):
    """`_both` on a scalar function of `module(x)` (a sin, so no gradient is constant), checked to agree."""
    graph, state = nnx.split(module)

    def fn(x, state):
        return jnp.sum(jnp.sin(nnx.merge(graph, state)(x)) * 1.7)

    results = _both(fn, x, state)
    _assert_agree(results)
    return results


@pytest.mark.parametrize("kernel,stride,padding", [
    (3, 1, ((1, 1), (1, 1))),
    (5, 2, ((1, 2), (1, 2))),  # EfficientNet's adjusted stride-2 padding
    (4, 1, ((1, 2), (1, 2))),  # an even kernel, torch 'same'
    (3, 2, ((1, 1), (1, 1))),  # CvT's strided keys/values
])
def test_depthwise_conv_kernels_agree(kernel, stride, padding):
    conv = layers.DepthwiseConv(6, kernel, strides=stride, padding=padding, use_bias=True, rngs=nnx.Rngs(0))
    conv.bias.value = _array(6)
    results = _both_on_module(conv, _array(2, 11, 11, 6))
    assert max(group_counts(results["accelerator"][2])) == 6 and fence_predicates(results["accelerator"][2]) == 0
    assert max(group_counts(results["cpu"][2]), default=1) == 1


@pytest.mark.parametrize("stride,use_bias", [(1, True), (2, False)])
def test_pointwise_conv_kernels_agree(stride, use_bias):
    conv = layers.Conv(5, 7, (1, 1), strides=stride, padding="VALID", use_bias=use_bias, rngs=nnx.Rngs(0))
    if use_bias:
        conv.bias.value = _array(7)
    results = _both_on_module(conv, _array(2, 9, 9, 5))
    text_cpu, text_acc = results["cpu"][2], results["accelerator"][2]
    assert "stablehlo.convolution" in text_acc and fence_predicates(text_acc) == 0
    assert data_dependent_cases(text_acc) == 0
    assert "stablehlo.convolution" not in text_cpu and fence_predicates(text_cpu) == 1  # matmul, fenced


@pytest.mark.parametrize("scale", [8**-0.5, 0.1])
def test_attention_kernels_agree(scale):
    q, k, v = _array(2, 3, 17, 8), _array(2, 3, 6, 8), _array(2, 3, 6, 8)  # CvT-like: fewer keys than queries
    w = _array(2, 3, 17, 8)

    def fn(q, k, v):
        context, weights = layers.attention(q, k, v, scale, need_weights=False)
        assert weights is None
        return jnp.sum(jnp.sin(context) * w)

    results = _both(fn, q, k, v)
    _assert_agree(results)
    for kind in kernels.KERNELS:
        with kernels.force_kernels(kind):
            text = jax.jit(jax.grad(fn, (0, 1, 2))).lower(q, k, v).as_text(debug_info=True)
        assert (xla_attention_ops(text) > 0) == (kind == "accelerator"), kind
        assert (ops_from(text, layers._cpu_context) > 0) == (kind == "cpu"), kind


def test_attention_with_weights_or_dropout_keeps_the_weights_path():
    q, k, v = _array(2, 3, 17, 8), _array(2, 3, 6, 8), _array(2, 3, 6, 8)
    with kernels.force_kernels("accelerator"):
        context, weights = layers.attention(q, k, v, 0.3)
        text = jax.jit(lambda *a: layers.attention(*a, 0.3)).lower(q, k, v).as_text(debug_info=True)
        dropped = layers.attention(q, k, v, 0.3, nnx.Dropout(0.5, rngs=nnx.Rngs(0)), need_weights=False)
    assert weights.shape == (2, 3, 17, 6) and xla_attention_ops(text) == 0
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, atol=1e-6)
    assert dropped[1] is None and dropped[0].shape == context.shape


def test_bf16_attention_returns_the_cpu_kernels_fp32_context():
    q, k, v = (_array(2, 3, 17, 8, dtype=jnp.bfloat16) for _ in range(3))
    outs = {}
    for kind in kernels.KERNELS:
        with kernels.force_kernels(kind):
            outs[kind] = layers.attention(q, k, v, 0.3, need_weights=False)[0]
    assert outs["cpu"].dtype == outs["accelerator"].dtype == jnp.float32
    assert max_diff(outs["cpu"], outs["accelerator"]) <= 0.02 * float(jnp.abs(outs["cpu"]).max())
    assert kernels.cudnn_attention_supported(q[..., :8]) and not kernels.cudnn_attention_supported(q[..., :6])
    assert not kernels.cudnn_attention_supported(q.astype(jnp.float32))


# --- models: HF parity with the accelerator kernels ---------------------------------------------------------------

PARITY = {}  # measured errors, printed at the end (pytest -s)


@pytest.fixture
def accelerator_kernels():
    with kernels.force_kernels("accelerator"):
        yield


def _train_text(model, x) -> str:
    """The lowered train-mode gradient program of `model` (debug locations on)."""
    model.train()
    graph, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        return jnp.sum(nnx.merge(graph, params, rest, copy=True)(x).astype(jnp.float32) ** 2)

    return jax.jit(jax.grad(loss)).lower(params).as_text(debug_info=True)


def _assert_accelerator_program(text: str, *, grouped: bool = False, attention: bool = False):
    assert fence_predicates(text) == 0 and data_dependent_cases(text) == 0
    assert ops_from(text, layers._shifted_depthwise, layers._pointwise_matmul, layers._cpu_context) == 0
    if grouped:
        assert max(group_counts(text)) > 1 and max(group_counts(text, "batch_group_count")) > 1
    if attention:
        assert xla_attention_ops(text) > 0, XLA_ATTENTION_MARKERS


@nnx.jit
def _logits(model, pixels):
    return model(pixels)


@pytest.mark.usefixtures("accelerator_kernels")
def test_vit_parity_with_accelerator_kernels(tmp_path):
    hf, ours = test_vit._hf(tmp_path, **test_vit.SMALL)
    hf.set_attn_implementation("eager")  # for its attention weights
    x = images(3, 32)
    with torch.no_grad():
        ref = hf(torch.from_numpy(x), output_attentions=True)
    logits = max_diff(_logits(ours, nhwc(x)), ref.logits)
    out = ours.forward(nhwc(x), output_attentions=True)  # the weights path
    attentions = max(max_diff(a, b) for a, b in zip(out.attentions, ref.attentions, strict=True))
    assert logits <= 1e-4 and max_diff(out.logits, ref.logits) <= 1e-4 and attentions <= 1e-5, (logits, attentions)

    xg, labels = images(4, 32, seed=1), np.array([0, 1, 2, 4])
    ref_loss, ref_grads = torch_grads(hf.train(), x=xg, labels=labels, directory=tmp_path / "hf")
    ours.train()
    loss, grads = jax_grads(ours, xg, labels)
    assert abs(loss - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss))
    PARITY["vit"] = {"logits": logits, "attentions": attentions, **assert_grads_close(grads, ref_grads)}
    _assert_accelerator_program(_train_text(ours, nhwc(xg)), attention=True)


@pytest.mark.usefixtures("accelerator_kernels")
def test_resnet_parity_with_accelerator_kernels(tmp_path):
    config = dict(test_resnet.BOTTLENECK, downsample_in_bottleneck=True)  # strided 1×1 convolutions too
    hf, ours = test_resnet._hf(tmp_path, **config)
    x = images(2, 40)
    logits = max_diff(_logits(ours, nhwc(x)), torch_logits(hf, x))
    hf.train()
    ours.train()
    xg, labels = images(4, 40, seed=1), np.array([0, 1, 2, 1])
    ref_loss, ref_grads = torch_grads(hf, xg, labels, tmp_path / "hf")
    loss, grads = jax_grads(ours, xg, labels)
    assert logits <= 1e-4 and abs(loss - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss)), logits
    PARITY["resnet"] = {"logits": logits, **assert_grads_close(grads, ref_grads)}
    text = _train_text(ours, nhwc(xg))
    _assert_accelerator_program(text)
    assert text.count("stablehlo.convolution") >= 3 * 13 - 1  # 13 convolutions, all plain, 1×1 included


def _model_parity(name, hf, directory, size, forward=lambda m, p: m(p), labels=np.array([0, 1, 2, 4])):
    ours = from_pretrained(directory)
    x = images(2, size)
    with torch.no_grad():
        ref = forward(hf, torch.from_numpy(x)).logits
    logits = max_diff(_logits(ours, nhwc(x)), ref)
    assert logits <= 1e-4, logits
    result = check_train_step(copy.deepcopy(hf), ours, images(4, size, seed=1), labels % hf.config.num_labels,
                              forward=forward)
    PARITY[name] = {"logits": logits, "train_logits": result["logits"], "global_rel": result["grad_global_rel"],
                    "worst_tensor_rel": result["grad_worst_rel"]}
    return ours, x


@pytest.mark.usefixtures("accelerator_kernels")
@pytest.mark.parametrize("config", ["small", "odd"])
def test_efficientnet_parity_with_accelerator_kernels(tmp_path, config):
    settings, size = test_efficientnet.CONFIGS[config]
    hf = test_efficientnet._hf_model(settings)
    ours, x = _model_parity(f"efficientnet-{config}", hf, save_plain(hf, tmp_path / "hf"), size)
    _assert_accelerator_program(_train_text(ours, nhwc(x)), grouped=True)


@pytest.mark.usefixtures("accelerator_kernels")
@pytest.mark.parametrize("config", ["no-cls", "cls-avg"])
def test_cvt_parity_with_accelerator_kernels(tmp_path, config):
    hf = test_cvt._hf_model(test_cvt.CONFIGS[config])
    ours, x = _model_parity(f"cvt-{config}", hf, save_plain(hf, tmp_path / "hf"), test_cvt.SIZE,
                            forward=test_cvt._torch_forward, labels=np.array([0, 1, 2, 2]))
    _assert_accelerator_program(_train_text(ours, nhwc(x)), grouped=True, attention=True)


def teardown_module():
    for name, result in PARITY.items():
        print(f"accelerator kernels vs HF: {name}: " + ", ".join(f"{k} {v:.2e}" for k, v in result.items()))
