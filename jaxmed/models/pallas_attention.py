"""Whole-sequence fused attention for TPUs (a Pallas/Mosaic kernel) on token-major tensors, for the short
sequences of ViTs (197 tokens) and CvT's later stages.

Why not splash attention there: splash tiles tokens by 128, so it needs head-major (B, heads, T, head_dim) copies of
q, k and v padded to a multiple of 128, slices its output back, and writes its softmax statistics 128 lanes wide
in fp32 for the backward pass. For ViT-B/16 that glue (transposes, pads, slices, the statistics and their layout
copies) moved more bytes through HBM than the kernels themselves (README, "model.remat" and the compiler figures).
Here one kernel step takes one image and a group of heads straight from the projections' (B, T, heads·head_dim)
layout (the lane dimension holds 128 // head_dim heads), keeps each head's whole tokens × tokens scores in VMEM,
and writes only the context; the backward kernel recomputes the softmax from q and k instead of reading saved
statistics. Nothing is padded: a block spans all tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

LANES = 128
# One head's queries × keys whose fp32 scores (and, backward, their gradients) a kernel step keeps in VMEM; larger
# sequences (CvT-13's first stage, 3136 × 784) go to splash attention, which tiles them.
MAX_SCORES = 512 * 512
# VMEM for a step's blocks: the backward kernel's eight (five in, three out), each double-buffered by the pipeline.
# With the scores above this stays within Mosaic's default 16 MiB scoped VMEM (v4, v5e, v5p; v6e has 32).
MAX_BLOCK_BYTES = 8 * 2**20


def heads_per_block(num_heads: int, head_dim: int) -> int:
    """Heads one kernel step takes: a 128-lane slice of the hidden dimension when it splits so, else all of it (a
    block must span 128 lanes or the whole dimension)."""
    if (num_heads * head_dim) % LANES == 0 and LANES % head_dim == 0:
        return LANES // head_dim
    return num_heads


def supported(q, k) -> bool:
    """Whether head-major q (B, heads, queries, head_dim) and k fit a kernel step whole."""
    _, heads, queries, head_dim = q.shape
    width = heads_per_block(heads, head_dim) * head_dim
    blocks = 16 * max(queries, k.shape[2]) * width * q.dtype.itemsize
    return queries * k.shape[2] <= MAX_SCORES and blocks <= MAX_BLOCK_BYTES


def attention(q, k, v, *, scale: float, interpret: bool = False):
    """softmax(q kᵀ · scale) v on head-major (B, heads, T, head_dim) arrays, as the models hold them; the kernel
    runs on their token-major form, which XLA reads from the projections without a copy."""
    batch, heads, queries, head_dim = q.shape
    tokens_major = lambda t: t.transpose(0, 2, 1, 3).reshape(batch, t.shape[2], heads * head_dim)  # noqa: E731
    out = _attention(tokens_major(q), tokens_major(k), tokens_major(v), heads, float(scale), interpret)
    return out.reshape(batch, queries, heads, head_dim).transpose(0, 2, 1, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _attention(q, k, v, heads, scale, interpret):
    return _forward(q, k, v, heads, scale, interpret)


def _attention_fwd(q, k, v, heads, scale, interpret):
    out = _forward(q, k, v, heads, scale, interpret)
    return out, (q, k, v, out)


def _attention_bwd(heads, scale, interpret, residuals, cotangent):
    q, k, v, out = residuals
    return _backward(q, k, v, out, cotangent.astype(out.dtype), heads, scale, interpret)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _grid_and_specs(q, k, heads):
    batch, _, width = q.shape
    head_dim = width // heads
    group = heads_per_block(heads, head_dim)
    q_spec = pl.BlockSpec((1, q.shape[1], group * head_dim), lambda b, g: (b, 0, g))
    k_spec = pl.BlockSpec((1, k.shape[1], group * head_dim), lambda b, g: (b, 0, g))
    return (batch, heads // group), q_spec, k_spec, group, head_dim


def _cost(q, k, heads: int, matmuls: int, arrays) -> pl.CostEstimate:
    """What the kernel does, for XLA's cost analysis (a custom call is opaque to it): `matmuls` products of
    queries × keys × head_dim per head, one exponential per score, and each array read or written once."""
    batch, queries, width = q.shape
    scores = batch * queries * k.shape[1]
    return pl.CostEstimate(flops=2 * matmuls * scores * width, transcendentals=scores * heads,
                           bytes_accessed=sum(t.size * t.dtype.itemsize for t in arrays))


def _forward(q, k, v, heads, scale, interpret):
    grid, q_spec, k_spec, group, head_dim = _grid_and_specs(q, k, heads)
    kernel = functools.partial(_forward_kernel, heads=group, head_dim=head_dim, scale=scale)
    return pl.pallas_call(kernel, grid=grid, in_specs=[q_spec, k_spec, k_spec], out_specs=q_spec,
                          out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), interpret=interpret,
                          cost_estimate=_cost(q, k, heads, 2, (q, k, v, q)), name="tokens_attention_fwd")(q, k, v)


def _backward(q, k, v, out, d_out, heads, scale, interpret):
    grid, q_spec, k_spec, group, head_dim = _grid_and_specs(q, k, heads)
    kernel = functools.partial(_backward_kernel, heads=group, head_dim=head_dim, scale=scale)
    shapes = [jax.ShapeDtypeStruct(t.shape, t.dtype) for t in (q, k, v)]
    return pl.pallas_call(kernel, grid=grid, in_specs=[q_spec, k_spec, k_spec, q_spec, q_spec],
                          out_specs=[q_spec, k_spec, k_spec], out_shape=shapes, interpret=interpret,
                          cost_estimate=_cost(q, k, heads, 5, (q, k, v, out, d_out, q, k, v)),
                          name="tokens_attention_bwd")(q, k, v, out, d_out)


def _contract(a, b, a_dim: int, b_dim: int):
    """a · b contracting a's dimension `a_dim` with b's `b_dim`, accumulated in fp32."""
    return jax.lax.dot_general(a, b, (((a_dim,), (b_dim,)), ((), ())), preferred_element_type=jnp.float32)


def _probabilities(q, k, scale):
    scores = _contract(q, k, 1, 1) * scale  # (queries, keys), fp32
    scores = jnp.exp(scores - scores.max(axis=-1, keepdims=True))
    return scores / scores.sum(axis=-1, keepdims=True)


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, *, heads, head_dim, scale):
    q, k, v = q_ref[0], k_ref[0], v_ref[0]
    outs = []
    for head in range(heads):
        cols = slice(head * head_dim, (head + 1) * head_dim)
        p = _probabilities(q[:, cols], k[:, cols], scale)
        outs.append(_contract(p.astype(v.dtype), v[:, cols], 1, 0))
    o_ref[0] = jnp.concatenate(outs, axis=-1).astype(o_ref.dtype)


def _backward_kernel(q_ref, k_ref, v_ref, o_ref, do_ref, dq_ref, dk_ref, dv_ref, *, heads, head_dim, scale):
    """FlashAttention's backward for whole rows: dS = P ∘ (dO Vᵀ − rowsum(dO ∘ O))."""
    q, k, v, o, d_o = q_ref[0], k_ref[0], v_ref[0], o_ref[0], do_ref[0]
    dqs, dks, dvs = [], [], []
    for head in range(heads):
        cols = slice(head * head_dim, (head + 1) * head_dim)
        qh, kh, vh, doh = q[:, cols], k[:, cols], v[:, cols], d_o[:, cols]
        p = _probabilities(qh, kh, scale)
        dvs.append(_contract(p.astype(doh.dtype), doh, 0, 0))
        delta = jnp.sum(doh.astype(jnp.float32) * o[:, cols].astype(jnp.float32), axis=-1, keepdims=True)
        ds = (p * (_contract(doh, vh, 1, 1) - delta)).astype(qh.dtype)
        dqs.append(_contract(ds, kh, 1, 0) * scale)
        dks.append(_contract(ds, qh, 0, 0) * scale)
    for ref, parts in ((dq_ref, dqs), (dk_ref, dks), (dv_ref, dvs)):
        ref[0] = jnp.concatenate(parts, axis=-1).astype(ref.dtype)
