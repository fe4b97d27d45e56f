"""Resuming a workdir with a different config: an error naming the keys that would make a hybrid run (half one
experiment, half another), unless `train.resume=ignore_changes`, which records the change and its step in
W/config_history.json. Keys that cannot change the trained weights may differ freely.
"""

from __future__ import annotations

import datetime
import json
import logging

from jaxmed.errors import JaxmedError

FREE = {  # keys (a section stands for all its keys) that may change on resume, and why they cannot change results
    "train.log_every_steps": "logging cadence",
    "train.eval_batch_size": "evaluation batch size",
    "train.async_checkpoints": "how checkpoints are written",
    "train.keep_best": "how many best checkpoints are kept, not which is best",
    "train.evaluate_test": "evaluation after training",
    "train.resume": "this check itself",
    "eval": "evaluation after training; python -m jaxmed.evaluate reruns it",
    "mesh": "the device layout: a checkpoint restores on any device count",
    "data.cache_dir": "where decoded images are cached",
    "data.num_workers": "input worker processes",
    "data.decode_threads": "decoding threads",
    "data.source": "a hint in error messages",
    "data.strict": "whether unreadable files are an error (they are skipped either way)",
}
RESUME_MODES = ("check", "ignore_changes")
HISTORY = "config_history.json"
log = logging.getLogger("jaxmed.train")


def _flat(node, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict) and value and key != "hf_config":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _is_free(key: str) -> bool:
    parts = key.split(".")
    return any(".".join(parts[:depth]) in FREE for depth in range(1, len(parts) + 1))


def changed_keys(stored, config) -> dict:
    """{dotted key: (stored value, new value)} of the keys that change the training."""
    old, new = (_flat(json.loads(c.to_json_best_effort())) for c in (stored, config))
    return {key: (old.get(key), new.get(key)) for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key) and not _is_free(key)}


def saved_steps(workdir) -> dict:
    """{run directory relative to W ("" or fold_<k>): latest saved step} of W and its cross-validation folds."""
    steps = {}
    for run in [workdir, *sorted(workdir.glob("fold_*"))]:
        directory = run / "checkpoints"
        found = [int(p.name) for p in directory.iterdir() if p.name.isdigit()] if directory.exists() else []
        if found:
            steps["" if run == workdir else run.name] = max(found)
    return steps


def check_resume(config, workdir) -> None:
    """Before W/config.json is rewritten: the same results-changing keys as the run already in W, or an error."""
    from jaxmed.config import load_run_config

    mode = config.train.get("resume", "check")
    if mode not in RESUME_MODES:
        raise JaxmedError(f"train.resume={mode!r} must be one of {', '.join(RESUME_MODES)}")
    steps = saved_steps(workdir) if workdir.exists() else {}
    if not steps or not (workdir / "config.json").exists():
        return
    changed = changed_keys(load_run_config(workdir), config)
    if not changed:
        return
    where = ", ".join(f"{run or 'W'} at step {step}" for run, step in steps.items())
    if mode != "ignore_changes":
        shown = "; ".join(f"{key}: {old!r} → {new!r}" for key, (old, new) in changed.items())
        raise JaxmedError(f"{workdir} holds a run saved with another config ({where}); resuming would mix two "
                          f"experiments. Changed: {shown}. Use a new --workdir, or add "
                          f"--config.train.resume=ignore_changes to resume anyway (recorded in {HISTORY})")
    path = workdir / HISTORY
    history = json.loads(path.read_text()) if path.exists() else []
    history.append({"resumed_at_step": steps if set(steps) != {""} else steps[""],
                    "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "changed": {key: {"old": old, "new": new} for key, (old, new) in changed.items()}})
    path.write_text(json.dumps(history, indent=1) + "\n")
    log.warning("resuming %s (%s) with a changed config, recorded in %s: %s", workdir, where, path,
                "; ".join(f"{key}: {old!r} → {new!r}" for key, (old, new) in changed.items()))
