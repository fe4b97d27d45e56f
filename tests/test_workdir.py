"""Workdirs may be local (relative is fine) or on an object store (gs://…), where nothing can be appended to."""

import json
import os

from jaxmed.train.checkpoint import workdir_path
from jaxmed.train.metrics_writer import MetricsWriter


def test_workdir_path_keeps_urls_and_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(workdir_path("gs://bucket/runs/a")) == "gs://bucket/runs/a"
    assert str(workdir_path("gs://bucket/runs/a") / "checkpoints") == "gs://bucket/runs/a/checkpoints"
    assert str(workdir_path("runs/a")) == os.path.join(str(tmp_path), "runs/a")


def test_rewritten_metrics_file_keeps_earlier_runs_lines(tmp_path):
    """Without append (object stores), a resumed run rewrites metrics.jsonl whole — with the first run's lines."""
    for steps in ((1, 2), (3,)):
        writer = MetricsWriter(tmp_path, append=False)
        for step in steps:
            writer.write(step, {"train/loss": float(step)})
        writer.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert (tmp_path / "tensorboard").is_dir()
