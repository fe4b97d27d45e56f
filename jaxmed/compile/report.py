"""Compile a config's programs for each target: one record per target and program (memory, fit, FLOPs, roofline,
structure), the largest batch that fits, a table for people and aot.json for tools."""

from __future__ import annotations

import json
import re
import sys
import time
import traceback

from jaxmed.compile import analysis, fit, programs
from jaxmed.compile import targets as jtargets
from jaxmed.errors import JaxmedError

# Without autotuning, XLA's Triton GEMM emitter can find no tile for a dot (GUIDE §7); cuBLAS then takes the dots.
TRITON_TILING_ERROR = "Couldn't find output tile sizes"
NO_TRITON_GEMM = {"xla_gpu_enable_triton_gemm": False}
MAX_FIT_BATCH = 1 << 14  # per device: past this the doubling stops (every shipped model fits less)
# The search stops when the bracket is within this fraction of the batch that fits: a full-size compile takes
# minutes here, and a batch known to ~6% is what a user needs to choose one.
FIT_RESOLUTION = 1 / 16
# Batches are probed in multiples of 8 (down to 8; smaller only when 8 does not fit): an unaligned batch pads and
# can need more memory than the aligned one above it, and 8 is what people choose batches by (fit.py).
FIT_MULTIPLE = 8


def compile_program(program: programs.Program, target: jtargets.Target, model_type: str, dtype: str) -> dict:
    """Lower and compile one program for `target`; its record (without target-wide fields)."""
    started = time.perf_counter()
    lowered = program.step.lower(*program.args)
    options, retried = {}, None
    try:
        compiled = lowered.compile()
    except Exception as error:  # jax raises XlaRuntimeError / JaxRuntimeError; only the tiling one is retried
        if target.platform != "cuda" or TRITON_TILING_ERROR not in str(error):
            raise
        options, retried = dict(NO_TRITON_GEMM), _first_lines(str(error), 1)
        compiled = lowered.compile(compiler_options=options)
    record = {"program": program.name, "per_device_batch": program.per_device_batch,
              "compile_seconds": round(time.perf_counter() - started, 2), **analysis.memory(compiled),
              "hbm_bytes": target.chip.hbm_bytes}
    record["fits"] = analysis.fits(record, target.chip.hbm_bytes)
    record.update(analysis.cost(compiled, lowered, target.platform, program_devices(program)))
    record.update(analysis.roofline(record["flops_per_step"], record["hbm_traffic_bytes"], target.chip,
                                    program.per_device_batch, program_devices(program)))
    record["flops_per_image"] = record["flops_per_step"] / program.per_device_batch
    record.update(analysis.structure(compiled.as_text(), target.platform, model_type, dtype))
    record["compiler_options"] = options
    record["retried_because"] = retried
    return record


def program_devices(program: programs.Program) -> int:
    leaf = program.args[-1]["image"] if isinstance(program.args[-1], dict) else program.args[-1]
    return leaf.sharding.mesh.size


def _first_lines(text: str, count: int = 3) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[:count])


def compile_target(config, name: str, *, num_classes: int | None = None, fit_batch: bool = False,
                   fit_only_if_needed: bool = False,
                   per_device_batch: int | None = None, include_eval: bool = True, resolution=FIT_RESOLUTION,
                   progress=None) -> list[dict]:
    """Every program of the run compiled for target `name`; a compiler error becomes a record with `error`.
    `per_device_batch` replaces train.batch_size by that many images per device."""
    target = jtargets.target(name)
    base = {"target": name, "platform": target.platform, "chip": target.chip.name, "hosts": target.hosts}
    devices = jtargets.devices(target)
    mesh = programs.target_mesh(config, devices, target.hosts, name)
    run = programs.abstract_run(config, mesh, programs.class_names(config, num_classes))
    model_type, dtype = run.spec.hf_config.model_type, str(config.model.dtype)
    records = []
    evals = [programs.eval_program(run, name)] if include_eval else []
    for program in [*programs.train_programs(run, name, per_device_batch), *evals]:
        entry = {**base, "devices": mesh.size}
        try:
            entry.update(compile_program(program, target, model_type, dtype))
        except JaxmedError:
            raise
        except Exception as error:  # the compiler's error, reported per target; the other targets still run
            if out_of_memory(error):  # libtpu refuses a program larger than HBM: it does not fit
                entry.update(_misfit(program, target, str(error)))
                records.append(entry)
                continue
            entry.update({"program": program.name, "per_device_batch": program.per_device_batch, "fits": None,
                          "error": f"{type(error).__name__}: {_first_lines(str(error))}"})
            if not str(error).strip():
                entry["error"] += " " + _first_lines(traceback.format_exc())
        records.append(entry)
        if progress is not None:
            progress.update(1)
    if fit_batch and (not fit_only_if_needed or any(r.get("fits") is False for r in records)):
        probes = []
        largest = largest_fitting_batch(run, target, model_type, dtype, records, resolution, probes)
        for entry in records:
            if entry["program"].startswith("train/"):
                entry["largest_fitting_batch"] = largest
                entry["fit_probes"] = probes
    return records


def out_of_memory(error: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()


def _misfit(program, target, message: str) -> dict:
    """The record of a program the compiler refused for want of HBM (TPU compiles fail there, with the size)."""
    temporaries = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", message)
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    return {"program": program.name, "per_device_batch": program.per_device_batch, "fits": False,
            "bytes_per_device": None, "peak_bytes": None, "hbm_bytes": target.chip.hbm_bytes,
            "temporary_bytes": (int(float(temporaries.group(1)) * scale[temporaries.group(2)])
                                if temporaries else None),
            "out_of_memory": _first_lines(message, 1)}


def largest_fitting_batch(run, target, model_type: str, dtype: str, records: list[dict],
                          resolution: float = FIT_RESOLUTION, probes: list | None = None) -> int | None:
    """The largest per-device batch whose most memory-hungry train step fits, to within `resolution` (fit.py: from
    the configured batch, doubling or halving once, then narrowing the bracket by interpolation; every probe is a
    compile). Each compile it made is appended to `probes` (batch, fits, the size it was judged by): the evidence of
    the answer, a fit there and a miss just above it, and a bracket to start from if a search is cut short."""
    trains = [r for r in records if r["program"].startswith("train/") and "error" not in r]
    if not trains:
        return None
    hungriest = max(range(len(trains)), key=lambda i: trains[i]["bytes_per_device"] or float("inf"))
    phase = [p.name for p in run.phases].index(trains[hungriest]["program"].removeprefix("train/"))
    limit = analysis.HEADROOM * target.chip.hbm_bytes

    def probe(batch: int) -> tuple[bool, float | None]:
        [program] = programs.train_programs(run, target.name, batch, phases=[phase])
        lowered = program.step.lower(*program.args)
        try:
            compiled = lowered.compile()
        except Exception as error:
            if target.platform == "cuda" and TRITON_TILING_ERROR in str(error):
                compiled = lowered.compile(compiler_options=dict(NO_TRITON_GEMM))
            elif out_of_memory(error):
                return _probed(batch, False, None)  # the compiler itself refused: the program cannot fit
            else:
                raise
        return _probed(batch, *_fit_and_size(analysis.memory(compiled), target))

    def _probed(batch: int, ok: bool, size: float | None) -> tuple[bool, float | None]:
        if probes is not None:
            probes.append({"per_device_batch": batch, "fits": ok, "bytes": size})
        # each probe is minutes of compiling: say where the search is (stderr, also from a child process)
        where = "refused by the compiler" if size is None else f"{size / 2**30:.2f} GiB of {limit / 2**30:.2f}"
        print(f"fit search {target.name}: {batch} per device {'fits' if ok else 'does not fit'} ({where})",
              file=sys.stderr, flush=True)
        return ok, size

    start = trains[hungriest]
    size = None if start["bytes_per_device"] is None else _fit_and_size(start, target)[1]  # None: refused
    if probes is not None:
        probes.append({"per_device_batch": start["per_device_batch"], "fits": start["fits"], "bytes": size})
    known = {start["per_device_batch"]: (start["fits"], size)}
    return fit.largest_fitting(probe, start["per_device_batch"], limit,
                               resolution=resolution, maximum=MAX_FIT_BATCH, multiple=FIT_MULTIPLE, known=known)


def _fit_and_size(memory: dict, target) -> tuple[bool, float]:
    """A step's fit and the size the fit test compares with the limit."""
    return analysis.fits(memory, target.chip.hbm_bytes), max(memory["bytes_per_device"], memory["peak_bytes"] or 0)


def compile_all(config, names: list[str], *, num_classes=None, fit_batch=False, fit_only_if_needed=False,
                per_device_batch=None,
                include_eval=True, resolution=FIT_RESOLUTION, progress=None) -> list[dict]:
    for name in names:  # every name checked before the first (slow) compile
        jtargets.target(name)
    records = []
    for name in names:
        try:
            records.extend(compile_target(config, name, num_classes=num_classes, fit_batch=fit_batch,
                                          fit_only_if_needed=fit_only_if_needed,
                                          per_device_batch=per_device_batch, include_eval=include_eval,
                                          resolution=resolution, progress=progress))
        except JaxmedError as error:
            if "not installed" not in str(error) and len(names) == 1:
                raise
            records.append({"target": name, "program": None, "fits": None, "error": str(error)})
    return records


_COLUMNS = (("target", "target", "{}"), ("program", "program", "{}"), ("devices", "dev", "{}"),
            ("hosts", "hosts", "{}"), ("per_device_batch", "batch/dev", "{}"),
            ("bytes_per_device", "GiB/dev", "gib"), ("hbm_bytes", "HBM GiB", "gib"), ("fits", "fits", "{}"),
            ("largest_fitting_batch", "max batch", "{}"), ("flops_per_step", "TFLOP/step", "tera"),
            ("hbm_traffic_bytes", "HBM GB/step", "giga"), ("roofline_images_per_second", "roofline img/s", "int"),
            ("roofline_bound", "bound", "{}"), ("host_callbacks", "host cb", "{}"),
            ("collectives", "collectives", "coll"), ("attention_kernel", "attention", "{}"),
            ("grouped_convolutions", "grouped conv", "{}"), ("compile_seconds", "compile s", "{}"))


def _cell(value, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "gib":
        return f"{value / 2**30:.2f}"
    if kind == "tera":
        return f"{value / 1e12:.3g}"
    if kind == "giga":
        return f"{value / 1e9:.3g}"
    if kind == "int":
        return f"{value:,.0f}"
    if kind == "coll":
        return ",".join(f"{k}:{v}" for k, v in value.items()) or "0"
    return str(value)


def table(records: list[dict]) -> str:
    """A plain-text table, one row per record; a failed program shows its error under its row."""
    rows = [[title for _, title, _ in _COLUMNS]]
    errors = []
    for record in records:
        rows.append([_cell(record.get(key), kind) for key, _, kind in _COLUMNS])
        if record.get("error"):
            errors.append(f"{record['target']} {record.get('program') or ''}: {record['error']}")
        if record.get("out_of_memory"):
            errors.append(f"{record['target']} {record['program']}: does not fit: {record['out_of_memory']}")
        if record.get("retried_because"):
            errors.append(f"{record['target']} {record['program']}: compiled with {record['compiler_options']} "
                          f"after: {record['retried_because']}")
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
    return "\n".join(lines + errors)


def write(records: list[dict], out) -> None:
    from etils import epath

    out = epath.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "aot.json").write_text(json.dumps(records, indent=1) + "\n")
