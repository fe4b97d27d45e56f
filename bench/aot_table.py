"""Compiler figures (not measurements) for every shipped config on the machines people rent: per-device memory of
the train step at 256 images per device (CvT-13: 128), the largest per-device batch that fits, FLOPs per image and
the roofline bound, from the TPU and GPU compilers run deviceless (jaxmed.aot).

    python bench/aot_table.py [--config configs/X.py ...] [--target v5litepod-8 ...] [--no-fit-batch] [--out F]

A full-size compile takes minutes on a small CPU (GUIDE §7): the whole table is hours on 2 cores; pass a subset.
Prints a Markdown table (for the README's performance section) and writes the records as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("v5litepod-8", "v6e-8", "v5p-8", "h100x8")
PER_DEVICE_BATCH = 256
PER_DEVICE_BATCH_BY_MODEL = {"cvt": 128}  # CvT-13's stage-1 tokens (56² × 64) make 256 a ~20 GiB step


def load_config(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.model.dtype = "bfloat16"
    config.mesh.data, config.mesh.fsdp = -1, 1  # every device of the target (demo's mesh.data=1 is for CPUs)
    return config


# where a config's images come from: read by no compiled program (the classes are counted separately)
DATA_SOURCE_KEYS = ("format", "root", "source")


def program_key(config, programs) -> str | None:
    """What a config's compiled programs depend on: the config without its data source, and its number of classes
    (their names are labels, not shapes). Configs with equal keys compile to the same programs (configs/brisc_vit.py
    and sartaj_vit.py differ only in where the images come from), so the table compiles one of them; None when the
    classes cannot be told here."""
    try:
        classes = programs.class_names(config, None)
    except Exception:  # noqa: BLE001 — this config's own compile reports the error
        return None
    tree = config.to_dict()
    for key in DATA_SOURCE_KEYS:
        tree["data"].pop(key, None)
    return json.dumps([tree, len(classes)], sort_keys=True, default=str)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", type=Path, help="configs/X.py (repeatable; default: all)")
    parser.add_argument("--target", action="append", help=f"repeatable; default: {', '.join(TARGETS)}")
    parser.add_argument("--no-fit-batch", dest="fit_batch", action="store_false",
                        help="skip the search for the largest batch (several compiles per target)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/aot_table.json"))
    args = parser.parse_args(argv)
    configs = args.config or sorted((ROOT / "configs").glob("*.py"))
    # the table is hours of compiling: each record is written as soon as it exists, and a rerun with the same --out
    # keeps the records already there (without an error) instead of compiling them again
    records = json.loads(args.out.read_text()) if args.out.exists() else []
    done = {(r["config"], r.get("target")) for r in records if not r.get("error")}
    records = [r for r in records if not r.get("error")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from jaxmed.compile import targets

    targets.prepare_process()
    from jaxmed.compile import isolated, programs
    from jaxmed.errors import JaxmedError

    # every shipped config's key: a record kept from an earlier run may be the twin of a config run now
    keys = {path.stem: program_key(load_config(path), programs)
            for path in {*configs, *(ROOT / "configs").glob("*.py")}}
    for path in tqdm(configs, desc="configs"):
        config = load_config(path)
        try:
            model_type = programs.model_spec(config).hf_config.model_type
        except Exception as error:  # noqa: BLE001 — this config's row says why, and the table goes on
            records.append({"config": path.stem, "error": f"{type(error).__name__}: {error}"})
            continue
        batch = PER_DEVICE_BATCH_BY_MODEL.get(model_type, PER_DEVICE_BATCH)
        key = keys[path.stem]
        for target in args.target or TARGETS:
            if (path.stem, target) in done:
                continue
            twin = next((r for r in records if key is not None and keys.get(r["config"]) == key
                         and r.get("target") == target), None)
            if twin is not None:  # the same programs were compiled for another config: its figures are these
                records.append({**twin, "config": path.stem, "same_programs_as": twin["config"]})
                args.out.write_text(json.dumps(records, indent=1) + "\n")
                continue
            # each target in its own process (a libtpu SIGSEGV costs this row, not the table)
            try:
                found = isolated.compile_all(config, [target], per_device_batch=batch, include_eval=False,
                                             fit_batch=args.fit_batch)
            except JaxmedError as error:  # the config, before any compile (e.g. its classes are unknown here)
                found = [{"target": target, "error": str(error)}]
            found.sort(key=lambda r: -(r.get("bytes_per_device") or 0))  # the most memory-hungry phase stands
            records.append({"config": path.stem, "model": model_type, **found[0]})
            args.out.write_text(json.dumps(records, indent=1) + "\n")
    args.out.write_text(json.dumps(records, indent=1) + "\n")
    print(markdown(records))
    return 0


def markdown(records: list[dict]) -> str:
    lines = ["| config | target | batch/device | GiB/device (compiler's peak) | fits | largest batch/device | "
             "GFLOP/image | roofline img/s (all devices) | bound | attention |", "|" + "---|" * 10]
    for r in records:
        if r.get("error"):
            lines.append(f"| {r['config']} | {r.get('target', '-')} | error: {r['error'][:80]} ||||||||")
            continue
        if r.get("out_of_memory"):  # the TPU compiler refuses a program larger than HBM
            lines.append(f"| {r['config']} | {r['target']} | {r['per_device_batch']} | > HBM | no | "
                         f"{r.get('largest_fitting_batch', '-')} | - | - | - | - |")
            continue
        name = f"{r['config']} (= {r['same_programs_as']})" if r.get("same_programs_as") else r["config"]
        lines.append(f"| {name} | {r['target']} | {r['per_device_batch']} | "
                     f"{r['bytes_per_device'] / 2**30:.3g} ({r['peak_bytes'] / 2**30:.3g}) | "
                     f"{'yes' if r['fits'] else 'no'} | {r.get('largest_fitting_batch', '-')} | "
                     f"{r['flops_per_image'] / 1e9:.3g} | "
                     f"{r['roofline_images_per_second']:,.0f} | {r['roofline_bound']} | "
                     f"{r.get('attention_kernel') or '-'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
