"""Each target compiled in a child process: libtpu 0.0.42.1 dies outright (SIGSEGV, a stack overflow on its own
thread) compiling some programs — ResNet-50 for a v6e-8 — and that must cost the target's records, not the whole
run (`python -m jaxmed.aot`, bench/aot_table.py)."""

from __future__ import annotations

import json
import multiprocessing
import signal
import tempfile
from pathlib import Path


def compile_all(config, names: list[str], *, progress=None, worker=None, **options) -> list[dict]:
    """`report.compile_all(config, names, **options)`, one child process per target; a child that dies becomes
    that target's error record and the other targets still run. `worker(config, name, options, path)` writes the
    target's records as JSON to `path` (tests replace it)."""
    from jaxmed.compile import programs
    from jaxmed.compile import targets as jtargets

    for name in names:  # every name checked before the first (slow) compile
        jtargets.target(name)
    programs.class_names(config, options.get("num_classes"))  # a config error is one line here, not per target
    programs.model_spec(config)
    context = multiprocessing.get_context("spawn")  # a fresh jax and libtpu, not a fork of this process's
    records = []
    for name in names:
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "records.json"
            child = context.Process(target=worker or _compile_target, args=(config, name, options, path))
            child.start()
            child.join()
            if child.exitcode == 0 and path.exists():
                found = json.loads(path.read_text())
            else:
                found = [{"target": name, "program": None, "fits": None, "error": _death(child.exitcode)}]
        records.extend(found)
        if progress is not None:
            progress.update(len(found))
    return records


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        return (f"the compiler process died ({name}); libtpu 0.0.42.1 crashes so on some programs (README: "
                "'A known compiler crash')")
    return f"the compiler process ended with exit code {exitcode} and no records"


def _compile_target(config, name: str, options: dict, path: Path) -> None:
    from jaxmed.compile import targets

    targets.prepare_process()  # before this process's jax starts a backend
    from jaxmed.compile import report
    from jaxmed.errors import JaxmedError

    try:
        records = report.compile_all(config, [name], **options)
    except JaxmedError as error:  # e.g. a batch that does not divide over the target's devices
        records = [{"target": name, "program": None, "fits": None, "error": str(error)}]
    path.write_text(json.dumps(records))
