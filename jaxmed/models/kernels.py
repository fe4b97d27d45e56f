"""Per-backend kernels: one place decides, from the platform a computation is compiled for, whether a layer runs
XLA:CPU's rewrites (in layers.py) or the plain operations GPUs and TPUs run well (here)."""

from __future__ import annotations

import contextlib
import functools
import warnings

import jax
import jax.numpy as jnp

# --- Per-backend kernels ------------------------------------------------------------------------------------------
#
# XLA:CPU needs the rewrites below (it runs grouped convolutions 15-70x slower than shifted multiply-adds, a 1x1
# convolution's filter gradient on transposed copies, and fuses across block boundaries unless fenced); XLA:GPU and
# XLA:TPU run the plain operations well and would only pay for the rewrites. The choice is made in one place,
# `per_backend`, from the platform the computation is compiled for, i.e. the devices its arrays live on:
#   * under a trace (jit, grad, export) it stages both kernels with `lax.platform_dependent`, and lowering keeps
#     the one for the platform it lowers for: a step jitted on CPU arrays gets the CPU kernels even on a GPU host,
#     and `jax.export(..., platforms=["cuda"])` on a laptop gets the GPU kernels (tests/test_lowering.py);
#   * on concrete arrays (eager calls) it runs the kernel for the platform of their devices.
# A process-wide flag (`jax.default_backend()`) would get both of those cases wrong.
# Both kernels of a call must return the same shapes and dtypes (a conditional's contract): the accelerator kernel's
# outputs are cast to the CPU kernel's dtypes (e.g. fp32 out of a bf16 1x1 convolution, as the CPU matmul returns),
# which the consumers' casts then fuse with.

KERNELS = ("cpu", "accelerator")
FORCEABLE = (*KERNELS, "tpu")  # "tpu": the accelerator kernels with the TPU-only ones (Pallas attention)
_FORCED: list[str | None] = [None]


@contextlib.contextmanager
def force_kernels(kind: str):
    """Test-only: every layer traced inside uses `kind`'s kernels ("cpu", "accelerator" or "tpu"), whatever the
    platform.

    On CPU, "accelerator" runs the GPU/TPU kernels through XLA:CPU (attention through the XLA implementation of
    `jax.nn.dot_product_attention`: cuDNN cannot run there), so their numerics can be checked against PyTorch;
    "tpu" adds the TPU-only kernels (Pallas attention kernels, run by Pallas's interpreter: XLA:CPU cannot run
    Mosaic).
    The choice is made while tracing, so jax's compilation caches are cleared on entry and exit: a function traced
    before must not be reused with the other kernels.
    """
    if kind not in FORCEABLE:
        raise ValueError(f"force_kernels: kind must be one of {FORCEABLE}, got {kind!r}")
    previous = _FORCED[0]
    jax.clear_caches()
    _FORCED[0] = kind
    try:
        yield
    finally:
        _FORCED[0] = previous
        jax.clear_caches()


def forced_kernels() -> str | None:
    """The kernels `force_kernels` imposes now, or None (the platform decides)."""
    return _FORCED[0]


def kernels_for(platform: str) -> str:
    """"cpu" for XLA:CPU, "accelerator" for every other platform (cuda, rocm, tpu; jax's device.platform "gpu")."""
    return "cpu" if platform == "cpu" else "accelerator"


def _concrete_platform(args) -> str | None:
    """The platform of the devices holding `args`, when they are all concrete arrays on one platform."""
    platforms = set()
    for leaf in jax.tree.leaves(args):
        if isinstance(leaf, jax.core.Tracer):
            return None
        if isinstance(leaf, jax.Array):
            platforms.update(device.platform for device in leaf.devices())
        else:  # numpy or Python values: they go to the default device
            platforms.add(jax.default_backend())
    return platforms.pop() if len(platforms) == 1 else None


def _cast_like(kernel, reference):
    """`kernel` with its outputs cast to the dtypes `reference` returns on the same arguments."""

    def cast(*args):
        expected = jax.eval_shape(reference, *args)
        out = kernel(*args)
        return jax.tree.map(lambda o, e: o if o.dtype == e.dtype else o.astype(e.dtype), out, expected)

    return cast


def per_backend(*args, cpu, accelerator, cuda=None, tpu=None):
    """`cpu(*args)` on XLA:CPU, `cuda(*args)` on NVIDIA GPUs, `tpu(*args)` on TPUs (both default to
    `accelerator`), `accelerator(*args)` on every other platform. The kernels are pure functions of `args`
    (arrays; configuration goes in by `functools.partial`) and must agree in shapes; the accelerator kernels'
    dtypes are cast to the CPU kernel's.
    """
    forced = _FORCED[0]
    if forced == "cpu":
        return cpu(*args)
    accelerator = _cast_like(accelerator, cpu)
    tpu = accelerator if tpu is None else _cast_like(tpu, cpu)
    if forced == "accelerator":
        return accelerator(*args)
    if forced == "tpu":
        return tpu(*args)
    cuda = accelerator if cuda is None else _cast_like(cuda, cpu)
    platform = _concrete_platform(args)
    if platform is not None:
        if kernels_for(platform) == "cpu":
            return cpu(*args)
        if platform == "tpu":
            return tpu(*args)
        return cuda(*args) if on_cuda() else accelerator(*args)
    return jax.lax.platform_dependent(*args, cpu=cpu, cuda=cuda, tpu=tpu, default=accelerator)


@functools.cache
def on_cuda() -> bool:
    """Whether this process has an NVIDIA GPU backend (cuDNN attention can only be traced where one is)."""
    try:
        devices = jax.devices("gpu")
    except RuntimeError:  # no GPU backend in this process
        return False
    return any("rocm" not in device.client.platform_version.lower() for device in devices)


def identity(x):
    return x


@functools.cache
def cudnn_traceable() -> bool:
    """Whether cuDNN attention can be traced here: the CUDA plugin and its cuDNN are installed. A GPU is not
    needed — the program may be compiled for a GPU from a CPU host (`python -m jaxmed.aot`), and the kernels must
    follow the compile target, not this process's backend."""
    from jax._src.lib import cuda_versions

    if cuda_versions is None:
        return False
    try:
        return cuda_versions.cudnn_get_version() >= 8900  # fused attention's minimum
    except Exception:  # the plugin without its cuDNN library
        return False


def cudnn_attention_supported(q) -> bool:
    """cuDNN's fused attention takes bf16/fp16 and head_dim a multiple of 8 up to 256 (Hopper; GUIDE §6)."""
    return q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256


def fused_attention(q, k, v, *, scale, cudnn: bool):
    """`jax.nn.dot_product_attention` on our head-major tensors (it takes BTNH; the transposes cancel against the
    models' own). `cudnn`: the NVIDIA-GPU form (traced only for a GPU target), which uses cuDNN where it can be
    traced (the CUDA plugin and cuDNN installed, with or without a GPU here) and the dtype and head_dim are
    supported, and XLA's composition otherwise."""
    to_btnh = lambda t: jnp.swapaxes(t, 1, 2)  # noqa: E731
    implementation = "cudnn" if cudnn and cudnn_traceable() and cudnn_attention_supported(q) else None
    try:
        if implementation == "cudnn":
            out = _cudnn_attention(to_btnh(q), to_btnh(k), to_btnh(v), scale)
        else:
            out = jax.nn.dot_product_attention(to_btnh(q), to_btnh(k), to_btnh(v), scale=scale)
    except (NotImplementedError, RuntimeError) as error:  # cuDNN refused these shapes or this machine
        if implementation is None:
            raise
        warnings.warn(f"cuDNN attention unavailable for q {q.shape} {q.dtype}: {error}; using XLA's", stacklevel=2)
        out = jax.nn.dot_product_attention(to_btnh(q), to_btnh(k), to_btnh(v), scale=scale, implementation=None)
    return to_btnh(out)


def _cudnn_attention(q, k, v, scale):
    """cuDNN's fused attention on BTNH tensors. Its training kernels refuse odd sequence lengths (ViT-B/16 has 197
    tokens) when the gradient is traced, after the forward call has returned, where no fallback can catch it: odd
    lengths are padded by one and the padding masked (cuDNN's padding mask), then sliced off."""
    queries, keys = q.shape[1], k.shape[1]
    if queries % 2 == 0 and keys % 2 == 0:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
    pad = lambda t, length: jnp.pad(t, ((0, 0), (0, length % 2), (0, 0), (0, 0)))  # noqa: E731
    batch = q.shape[0]
    out = jax.nn.dot_product_attention(pad(q, queries), pad(k, keys), pad(v, keys), scale=scale,
                                       implementation="cudnn",
                                       query_seq_lengths=jnp.full((batch,), queries, jnp.int32),
                                       key_value_seq_lengths=jnp.full((batch,), keys, jnp.int32))
    return out[:, :queries]


def batch_mesh(mesh: jax.sharding.Mesh):
    """Context for tracing a step whose batch is split over every axis of `mesh`: kernels XLA's SPMD partitioner
    cannot split (Pallas/Mosaic custom calls) run per device inside `shard_map` over it. jax's own abstract-mesh
    context, so nothing is global; outside one (predict, explanations) those kernels are not used."""
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


# Pallas TPU splash attention tiles queries and keys by 128 (its default blocks; Mosaic's lane width): sequences
# are padded to a multiple of it, and segment ids keep real tokens from attending to the padding.
_SPLASH_BLOCK = 128


def tpu_attention(q, k, v, *, scale):
    """Attention on TPUs through a fused Pallas kernel, whose scores live in VMEM only, never in HBM (XLA's
    composition writes and keeps every head's tokens × tokens scores): for sequences whose scores fit VMEM whole
    (ViT's 197 tokens, CvT's later stages) jaxmed's token-major kernel (`pallas_attention`), for longer ones
    Pallas's splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`, as MaxText uses), which tiles
    them. (Pallas's `flash_attention` kernel keeps its softmax statistics 128 lanes wide, 2 KiB per query and head
    — more than the scores of a 197-token ViT: it made the step larger.) Mosaic's custom calls cannot be split by
    XLA's SPMD partitioner, so the kernel runs inside `shard_map` over the batch mesh of `batch_mesh`; without one,
    or when the batch does not divide over it, XLA's attention is used instead."""
    from jaxmed.models import pallas_attention

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or q.shape[0] % mesh.size:
        return fused_attention(q, k, v, scale=scale, cudnn=False)
    if pallas_attention.supported(q, k):
        kernel = functools.partial(pallas_attention.attention, scale=scale, interpret=_FORCED[0] == "tpu")
    else:
        kernel = functools.partial(_splash_attention, scale=scale)
    spec = jax.sharding.PartitionSpec(tuple(mesh.axis_names))
    return jax.shard_map(kernel, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


def _splash_attention(q, k, v, *, scale):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    queries, keys = q.shape[2], k.shape[2]
    padded = lambda n: -(-n // _SPLASH_BLOCK) * _SPLASH_BLOCK  # noqa: E731
    pad = lambda t, n: jnp.pad(t, ((0, 0), (0, 0), (0, padded(n) - n), (0, 0)))  # noqa: E731
    # segment 0: real tokens, 1: padding (padded queries attend to padded keys only, and are sliced off)
    segment = lambda n: (jnp.arange(padded(n)) >= n).astype(jnp.int32)  # noqa: E731
    segments = splash.SegmentIds(q=segment(queries), kv=segment(keys))
    mask = splash.MultiHeadMask([splash.FullMask((padded(queries), padded(keys)))] * q.shape[1])
    # forced "tpu" kernels (tests) run wherever the test runs: Pallas's interpreter, the kernel's own code in HLO
    kernel = splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, interpret=_FORCED[0] == "tpu")
    scaled = (q.astype(jnp.float32) * scale).astype(q.dtype)  # the kernel takes no scale: q is scaled, as MaxText
    out = jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=segments))(pad(scaled, queries), pad(k, keys),
                                                                          pad(v, keys))
    return out[:, :, :queries]


def grouped_depthwise(x, kernel, *, strides, padding):
    return jax.lax.conv_general_dilated(x, kernel, (strides, strides), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


def pointwise_conv(inputs, kernel, *, strides, precision):
    return jax.lax.conv_general_dilated(inputs, kernel, strides, "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=precision)
