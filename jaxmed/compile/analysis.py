"""What a compiled program says about itself: memory per device, FLOPs and HBM traffic, the roofline bound, and
its structure (host round trips, collectives, the attention kernel, grouped convolutions)."""

from __future__ import annotations

import re

HEADROOM = 0.95  # a program fits when it needs at most 95% of the chip's HBM (allocator fragmentation, runtime)

_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
# Host round trips inside a step: Python callbacks (jax.debug.print, pure_callback, io_callback) are custom calls
# on CPU/GPU and a host send (then a recv) on TPU; any host send/recv or in/outfeed is a transfer. Each stalls the
# accelerator until the host answers.
_HOST_CALLBACK = re.compile(r'custom_call_target="[^"]*callback[^"]*"|\bsend\([^\n]*is_host_transfer=true')
_HOST_TRANSFER = re.compile(r"\b(?:send|recv|infeed|outfeed)\([^\n]*|\b(?:infeed|outfeed)\(")
_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')
_GROUPED_CONV = re.compile(r"feature_group_count=(\d+)")
_ATTENTION_MODELS = ("vit", "cvt")


def memory(compiled) -> dict:
    """Per-device bytes from XLA's buffer assignment."""
    stats = compiled.memory_analysis()
    arguments, outputs = stats.argument_size_in_bytes, stats.output_size_in_bytes
    temporaries, aliased = stats.temp_size_in_bytes, stats.alias_size_in_bytes
    return {"bytes_per_device": int(arguments + outputs + temporaries - aliased),
            "argument_bytes": int(arguments), "output_bytes": int(outputs), "temporary_bytes": int(temporaries),
            "aliased_bytes": int(aliased), "peak_bytes": int(getattr(stats, "peak_memory_in_bytes", 0) or 0)}


def fits(record: dict, hbm_bytes: int) -> bool:
    """Within HBM with 5% headroom, by the larger of the buffer sum and the compiler's own peak."""
    return max(record["bytes_per_device"], record["peak_bytes"]) <= HEADROOM * hbm_bytes


def cost(compiled, lowered, platform: str, devices: int) -> dict:
    """FLOPs and HBM traffic per device per step. TPU: the compiler's cost analysis of the partitioned program.
    GPU: the CUDA compiler has none; the FLOPs come from XLA's CPU cost model on the unpartitioned program, divided
    over the devices (it counts nothing inside cuDNN custom calls, so fused attention is missing), no traffic."""
    if platform == "tpu":
        analysis = compiled.cost_analysis()
        analysis = analysis[0] if isinstance(analysis, list) else analysis
        return {"flops_per_step": float(analysis.get("flops", 0.0)),
                "hbm_traffic_bytes": float(analysis.get("bytes accessed", 0.0)), "flops_source": "tpu cost analysis"}
    import jax
    from jax._src.lib import _jax

    module = lowered.compiler_ir("hlo").as_hlo_module()
    analysis = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
    return {"flops_per_step": float(analysis.get("flops", 0.0)) / devices, "hbm_traffic_bytes": None,
            "flops_source": "XLA CPU cost model of the unpartitioned step / devices (cuDNN calls not counted)"}


def roofline(flops: float, traffic: float | None, chip, images_per_device: int, devices: int) -> dict:
    """The best the chip could do: a step takes at least FLOPs / peak and traffic / bandwidth."""
    compute_seconds = flops / chip.peak_bf16_flops
    memory_seconds = traffic / chip.hbm_bandwidth if traffic is not None else 0.0
    seconds = max(compute_seconds, memory_seconds)
    bound = "memory" if memory_seconds > compute_seconds else "compute"
    return {"roofline_images_per_second": images_per_device * devices / seconds if seconds else None,
            "roofline_bound": bound, "roofline_step_seconds": seconds}


def structure(text: str, platform: str, model_type: str, dtype: str) -> dict:
    """The compiled program's shape, from its optimized HLO text."""
    targets = _CUSTOM_CALL.findall(text)
    collectives = {}
    for name in _COLLECTIVES:
        count = len(re.findall(rf"\b{name}(?:-start)?\(", text))
        if count:
            collectives[name] = count
    transfers = [line for line in _HOST_TRANSFER.findall(text)
                 if "is_host_transfer=true" in line or line.startswith(("infeed", "outfeed"))]
    return {"host_callbacks": len(_HOST_CALLBACK.findall(text)), "host_transfers": len(transfers),
            "collectives": collectives,
            "attention_kernel": attention_kernel(targets, text, model_type),
            "grouped_convolutions": sum(1 for groups in _GROUPED_CONV.findall(text) if int(groups) > 1)}


def attention_kernel(custom_calls: list[str], text: str, model_type: str) -> str | None:
    """cudnn (fused attention custom calls), pallas (a Mosaic kernel named for attention), xla (attention as plain
    dots and a softmax), or None for a model without attention."""
    if any("fmha" in target for target in custom_calls):
        return "cudnn"
    if any(target == "tpu_custom_call" for target in custom_calls) and re.search(r"flash|splash|attention", text):
        return "pallas"
    return "xla" if model_type in _ATTENTION_MODELS else None
