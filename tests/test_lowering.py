"""Proof from lowering, on CPU: the full-size train steps (forward, backward, AdamW) exported for CUDA and TPU use the
accelerator kernels that `kernels.per_backend` picks for them — grouped convolutions, plain 1×1 convolutions, no
fusion fences, `jax.nn.dot_product_attention` — and the same steps lowered for CPU keep the CPU rewrites.

Nothing is forced here: the choice is the production one, made at lowering from the target platform. Models are
abstract (`nnx.eval_shape`), batch 2 at 224², so nothing big is materialised. The helpers below read StableHLO text
and are reused by test_backend_kernels.py.
"""

from __future__ import annotations

import collections
import functools
import inspect
import re

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from transformers import EfficientNetConfig, ViTConfig

from jaxmed.models import EfficientNet, ViT, kernels, layers
from jaxmed.train import step_function

# --- StableHLO readers ------------------------------------------------------------------------------------------


def op_counts(text: str) -> collections.Counter:
    """Occurrences of each stablehlo/chlo op (generic "stablehlo.case"(...) form included)."""
    return collections.Counter(re.findall(r"\b((?:stablehlo|chlo)\.[a-z_]+)\b", text))


def group_counts(text: str, kind: str = "feature_group_count") -> list[int]:
    """The `feature_group_count` (or `batch_group_count`) of every convolution, in order."""
    return [int(n) for n in re.findall(rf"{kind} = (\d+)", text)]


def activation_slices(text: str) -> int:
    """Slices and pads of rank-4 (NHWC) tensors: the shifted windows of the CPU depthwise form and their gradients
    (the rng's slices of its 2-word keys do not count)."""
    return len(re.findall(r"stablehlo\.(?:slice|pad) [^\n]*: \(tensor<\d+x\d+x\d+x\d+x", text))


def fence_predicates(text: str) -> int:
    """`_fence`'s signature: a value compared with itself for equality (False only for NaN)."""
    return len(re.findall(r"stablehlo\.compare\s+EQ,\s*(%[\w#.]+),\s*\1\s*,", text))


def data_dependent_cases(text: str) -> int:
    """Conditionals whose branch index is computed from data (a fence), not a constant. `lax.platform_dependent`
    leaves one-branch `case`s indexed by a constant (or by a case of constants) after single-platform lowering."""
    definitions, dependent = {}, 0
    for line in text.splitlines():
        case = re.search(r'"stablehlo\.case"\((%[\w#.]+)\)', line)
        if case:
            name = case.group(1).split("#")[0]
            if not definitions.get(name, False):
                dependent += 1
        defined = re.match(r"\s*(%[\w.]+)(?::\d+)?\s*=\s*(.*)", line)
        if defined:
            rhs = defined.group(2)
            static = rhs.startswith("stablehlo.constant") or (
                case is not None and definitions.get(case.group(1).split("#")[0], False))
            definitions[defined.group(1)] = static
    return dependent


def source_lines(function) -> range:
    lines, start = inspect.getsourcelines(function)
    return range(start, start + len(lines))


def op_locations(text: str) -> list[str]:
    """Each op's source location with its `#loc` references expanded (a module lists each location once)."""
    definitions = dict(re.findall(r"^(#loc\d*) = (.*)$", text, flags=re.M))

    @functools.cache
    def expand(name: str) -> str:
        return re.sub(r"#loc\d*", lambda m: expand(m.group(0)) if m.group(0) in definitions else m.group(0),
                      definitions.get(name, ""))

    return [expand(m) for m in re.findall(r"^(?!#loc).*\bloc\((#loc\d*)\)\s*$", text, flags=re.M)]


def ops_from(text: str, *functions) -> int:
    """How many ops were traced in the bodies of `functions` (of jaxmed/models/layers.py): an op's location is the
    innermost jaxmed frame, and ops of a custom_vjp's fwd/bwd are located at its call site."""
    wanted = set()
    for function in functions:
        wanted.update(source_lines(function))
    count = 0
    for location in op_locations(text):
        lines = {int(n) for n in re.findall(r'layers\.py":(\d+):', location)}
        count += bool(lines & wanted)
    return count


# XLA's jax.nn.dot_product_attention names its two einsums in the location name stack.
XLA_ATTENTION_MARKERS = ("BTNH,BSNH->BNTS", "BNTS,BSNH->BTNH")
CUDNN_ATTENTION = "__cudnn$fmha"
CPU_ATTENTION = (layers._cpu_context,)  # the call site of the CPU custom_vjp attention (fwd and bwd)
CPU_DEPTHWISE = (layers._shifted_depthwise,)
CPU_POINTWISE = (layers._pointwise_matmul,)


def xla_attention_ops(text: str) -> int:
    return sum(any(marker in location for marker in XLA_ATTENTION_MARKERS) for location in op_locations(text))


# --- the full-size train steps ----------------------------------------------------------------------------------

B0 = dict(width_coefficient=1.0, depth_coefficient=1.0, image_size=224, dropout_rate=0.2, hidden_dim=1280)
MODELS = {
    "vit-b16": lambda: ViT(ViTConfig(num_labels=4), dtype=jnp.bfloat16, rngs=nnx.Rngs(0)),
    "efficientnet-b0": lambda: EfficientNet(EfficientNetConfig(**B0, num_labels=4), dtype=jnp.bfloat16,
                                            rngs=nnx.Rngs(0)),
}
BATCH, SIZE = 2, 224


def abstract_train_step(name: str):
    """(step, abstract arguments) of jaxmed's train step (`step_function`: forward, backward, clipped AdamW) on an
    abstract model; the rng state is an argument too, so nothing is concrete."""
    model = nnx.eval_shape(MODELS[name])
    model.train()
    graph, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(2e-5, weight_decay=0.01))

    def step(state, batch, rest):
        return step_function(graph, rest, tx, lambda images: images, seed=0)(state, batch)

    state = {"params": params, "stats": stats, "opt": jax.eval_shape(tx.init, params),
             "step": jax.ShapeDtypeStruct((), jnp.int32)}
    batch = {"image": jax.ShapeDtypeStruct((BATCH, SIZE, SIZE, 3), jnp.float32),
             "label": jax.ShapeDtypeStruct((BATCH,), jnp.int32)}
    return step, (state, batch, rest)


@functools.lru_cache(maxsize=None)
def exported_text(name: str, platform: str) -> str:
    step, arguments = abstract_train_step(name)
    exported = jax.export.export(jax.jit(step), platforms=[platform])(*arguments)
    return exported.mlir_module()


def _summary(text: str) -> dict:
    counts = op_counts(text)
    return {"convolution": counts["stablehlo.convolution"], "dot_general": counts["stablehlo.dot_general"],
            "nhwc_slices_and_pads": activation_slices(text), "case": counts["stablehlo.case"],
            "grouped_fwd_or_dgrad": sum(n > 1 for n in group_counts(text)),
            "grouped_wgrad": sum(n > 1 for n in group_counts(text, "batch_group_count")),
            "fence_predicates": fence_predicates(text), "data_dependent_cases": data_dependent_cases(text),
            "xla_attention_ops": xla_attention_ops(text), "cudnn_calls": text.count(CUDNN_ATTENTION),
            "cpu_attention_ops": ops_from(text, *CPU_ATTENTION), "cpu_depthwise_ops": ops_from(text, *CPU_DEPTHWISE),
            "cpu_pointwise_ops": ops_from(text, *CPU_POINTWISE)}


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_efficientnet_b0_accelerator_step_uses_grouped_and_plain_convolutions(platform):
    text = exported_text("efficientnet-b0", platform)
    summary = _summary(text)
    print(platform, summary)
    # B0 has 16 depthwise convolutions: each is grouped forward and in its input gradient (feature_group_count = C;
    # the first block's input gradient feeds the stem's weights), and its filter gradient has batch_group_count = C.
    assert summary["grouped_fwd_or_dgrad"] >= 32 and summary["grouped_wgrad"] >= 16, summary
    assert summary["cpu_depthwise_ops"] == 0 and summary["nhwc_slices_and_pads"] == 0, summary
    # 1×1 convolutions stay convolutions: 81 forward (stem, 16 depthwise, 15 expand, 32 squeeze-excite, 16 project,
    # top), each with a filter gradient, all but the stem with an input gradient; the only matmul is the classifier's
    assert summary["convolution"] >= 3 * 81 - 1 and summary["dot_general"] <= 3, summary
    assert summary["cpu_pointwise_ops"] == 0, summary
    assert summary["fence_predicates"] == 0 and summary["data_dependent_cases"] == 0, summary


def test_efficientnet_b0_cpu_step_keeps_the_rewrites():
    """The control: the same step lowered for CPU has the shifted slices, matmuls and fences the readers look for."""
    summary = _summary(exported_text("efficientnet-b0", "cpu"))
    print("cpu", summary)
    assert summary["grouped_fwd_or_dgrad"] == 0 and summary["grouped_wgrad"] == 0, summary
    assert summary["nhwc_slices_and_pads"] >= 200 and summary["cpu_depthwise_ops"] > 0, summary
    assert summary["dot_general"] >= 100 and summary["cpu_pointwise_ops"] > 0, summary
    assert summary["fence_predicates"] >= 40 and summary["data_dependent_cases"] >= 40, summary


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_vit_b16_accelerator_step_uses_dot_product_attention(platform):
    if platform == "cuda" and kernels.cudnn_traceable():
        pytest.skip("the aot-gpu extra (cuDNN) is installed: the CUDA step calls cuDNN attention, whose custom call "
                    "jax.export refuses to serialize; test_aot's h100 compile checks that path instead")
    text = exported_text("vit-b16", platform)
    summary = _summary(text)
    print(platform, summary)
    # jax.nn.dot_product_attention (XLA form here), 12 layers: 2 einsums forward, their transposes backward
    assert summary["xla_attention_ops"] >= 2 * 12, summary
    # not our CPU attention (a custom_vjp that also returns the softmax weights)
    assert summary["cpu_attention_ops"] == 0, summary
    assert summary["fence_predicates"] == 0 and summary["data_dependent_cases"] == 0, summary
    assert summary["convolution"] >= 2, summary  # the patch embedding, forward and filter gradient


def test_vit_b16_cpu_step_keeps_the_cpu_attention():
    summary = _summary(exported_text("vit-b16", "cpu"))
    print("cpu", summary)
    assert summary["cpu_attention_ops"] > 0 and summary["xla_attention_ops"] == 0, summary


def test_vit_b16_cuda_step_calls_cudnn_attention():
    """Where this jax can trace cuDNN attention (a GPU with cuDNN in the process), the CUDA step calls it."""
    if not kernels.on_cuda():
        pytest.skip("cuDNN attention refuses to trace without a GPU ('cuDNN is not detected', GUIDE §6): the CUDA "
                    "export on this machine uses XLA's dot_product_attention (test_vit_b16_accelerator_step_...)")
    text = exported_text("vit-b16", "cuda")
    assert text.count(CUDNN_ATTENTION) >= 2 * 12, _summary(text)  # forward and backward per layer
    assert _summary(text)["xla_attention_ops"] == 0
