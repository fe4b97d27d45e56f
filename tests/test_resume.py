"""Preemption and resume through `python -m jaxmed.main`: SIGTERM, kill -9, and 8 devices → 1."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "tests/tiny_config.py")


def _command(workdir, cache, *overrides):
    return [sys.executable, "-m", "jaxmed.main", "--config", CONFIG, "--workdir", str(workdir),
            f"--config.data.cache_dir={cache}", "--config.train.evaluate_test=False", *overrides]


def _env(devices=8, **extra):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def _run(workdir, cache, *overrides, devices=8, cwd=ROOT):
    done = subprocess.run(_command(workdir, cache, *overrides), env=_env(devices), cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _losses(workdir):
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


def _final_params(workdir, step):
    restored = ocp.StandardCheckpointer().restore(Path(workdir) / "checkpoints" / str(step) / "state")
    return {k: np.asarray(v) for k, v in _flatten(restored["params"]).items()}


def _flatten(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _complete_steps(workdir):
    directory = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def _wait_for_step(workdir, process, step, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"run ended before step {step}: {process.stderr.read()[-2000:]}")
        metrics = Path(workdir) / "metrics.jsonl"
        if metrics.exists() and any(json.loads(line)["step"] >= step for line in metrics.read_text().splitlines()):
            return
        time.sleep(0.2)
    pytest.fail(f"step {step} not reached in {timeout}s")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    parent = tmp_path_factory.mktemp("uninterrupted")
    _run("run", cache, "--config.train.steps=12", cwd=parent)  # a relative workdir, as users type it
    return cache, parent / "run"


def test_sigterm_saves_exits_zero_and_resumes_bit_exactly(tmp_path, uninterrupted):
    cache, reference = uninterrupted
    workdir = tmp_path / "run"
    process = subprocess.Popen(_command(workdir, cache, "--config.train.steps=12"), env=_env(), cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(workdir, process, 3)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    assert "preempted at step" in out and "run the same command again to resume" in out
    stopped = int(out.split("preempted at step ")[1].split(":")[0])
    assert 3 <= stopped < 12
    resumed = _run(workdir, cache, "--config.train.steps=12")
    assert f"resuming from step {stopped}" in resumed.stderr
    assert _losses(workdir) == _losses(reference)  # every step, before and after the interruption
    ours, theirs = _final_params(workdir, 12), _final_params(reference, 12)
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_kill_9_restarts_from_the_last_complete_checkpoint(tmp_path, uninterrupted):
    cache, reference = uninterrupted
    workdir = tmp_path / "run"
    process = subprocess.Popen(_command(workdir, cache, "--config.train.steps=12"), env=_env(), cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(workdir, process, 7)  # past the first epoch's checkpoint (an async save: wait for its commit)
    deadline = time.time() + 120
    while not _complete_steps(workdir) and time.time() < deadline:
        time.sleep(0.1)
    process.kill()
    process.communicate()
    complete = _complete_steps(workdir)
    assert complete
    # what a kill during a save leaves behind: a half-written step directory orbax never committed
    partial = workdir / "checkpoints" / f"{complete[-1] + 1}.orbax-checkpoint-tmp-0"
    partial.mkdir()
    (partial / "junk").write_text("half a checkpoint")
    resumed = _run(workdir, cache, "--config.train.steps=12")
    assert f"resuming from step {complete[-1]}" in resumed.stderr
    ours, theirs = _final_params(workdir, 12), _final_params(reference, 12)
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_checkpoint_from_eight_devices_restores_on_one(tmp_path, uninterrupted):
    """Preempted on 8 devices (data=4, fsdp=2: sharded parameters), resumed on 1: same run."""
    cache, reference = uninterrupted
    workdir = tmp_path / "run"
    process = subprocess.Popen(_command(workdir, cache, "--config.train.steps=12", "--config.mesh.data=4",
                                        "--config.mesh.fsdp=2"), env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    _wait_for_step(workdir, process, 3)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0 and "preempted at step" in out, err[-2000:]
    stopped = int(out.split("preempted at step ")[1].split(":")[0])
    resumed = _run(workdir, cache, "--config.train.steps=12", "--config.mesh.data=1", devices=1)
    assert f"resuming from step {stopped}" in resumed.stderr
    losses, expected = _losses(workdir), _losses(reference)
    for step in range(1, 13):
        assert abs(losses[step] - expected[step]) <= 1e-5, step
