"""Two local processes joined by jax.distributed (gloo), configured by environment variables as the launch
scripts do on a TPU slice, form one job: one set of checkpoints and reports, and one process's numbers."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "tests/tiny_config.py")
pytestmark = pytest.mark.multihost


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _command(workdir, cache):
    return [sys.executable, "-m", "jaxmed.main", "--config", CONFIG, "--workdir", str(workdir),
            f"--config.data.cache_dir={cache}", "--config.train.steps=6", "--config.data.shards=2",
            "--config.train.eval_every_steps=3"]


def _env(devices, **extra):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT))
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(key, None)
    env.update(extra)
    return env


def _losses(workdir):
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


def test_two_processes_are_one_job_with_one_process_numbers(tmp_path):
    cache = tmp_path / "cache"
    single = subprocess.run(_command(tmp_path / "single", cache), env=_env(8), cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]

    port = _free_port()
    workdir = tmp_path / "multi"
    processes = [subprocess.Popen(_command(workdir, cache), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=_env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                                      JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)))
                 for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    assert "process 0 of 2" in outputs[0][1] and "process 1 of 2" in outputs[1][1]

    single_losses, multi_losses = _losses(tmp_path / "single"), _losses(workdir)
    assert sorted(multi_losses) == list(range(1, 7))  # one metrics.jsonl, written once per step
    for step, loss in single_losses.items():
        assert abs(multi_losses[step] - loss) <= 1e-5, step
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["6"]
    single_report = json.loads((tmp_path / "single/eval/test/report.json").read_text())
    multi_report = json.loads((workdir / "eval/test/report.json").read_text())
    assert multi_report["num_examples"] == single_report["num_examples"]  # every test image exactly once
    assert multi_report["confusion_matrix"] == single_report["confusion_matrix"]


def test_half_described_cluster_is_a_clear_error(monkeypatch):
    from jaxmed.errors import JaxmedError
    from jaxmed.distributed import maybe_initialize_distributed

    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    with pytest.raises(JaxmedError, match="JAX_NUM_PROCESSES"):
        maybe_initialize_distributed()
