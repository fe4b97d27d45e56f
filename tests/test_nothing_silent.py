"""A new user's usual mistakes are one-line errors (exit 2, no traceback) that name the key and the fix, never a run
that silently does something else: a data key the chosen source ignores, a changed config on resume, --config
missing, a one-class folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_configs import config_file
from jaxmed import config_history
from jaxmed.errors import JaxmedError

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests/tiny_config.py")


def _main(*args, cwd=ROOT):
    # JAX_PLATFORMS=cpu: a CUDA plugin installed on a machine without a GPU prints its own traceback at start-up
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), XLA_FLAGS="", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "jaxmed.main", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _one_line_error(done, *needles):
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    error = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1, done.stderr[-2000:]
    for needle in needles:
        assert needle in error[0], error[0]
    return error[0]


def test_a_data_root_the_synthetic_source_ignores_is_an_error(tmp_path):
    done = _main("--config", "configs/demo.py", "--workdir", str(tmp_path / "run"), "--config.data.root=digits4")
    _one_line_error(done, "data.root='digits4'", "data.format='synthetic'", "--config.data.format=imagefolder")
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


def test_source_keys_follow_the_format_the_user_chose():
    from jaxmed.data.source_keys import check_read_keys, unread_keys

    demo = config_file("configs/demo.py")
    demo.data.format = "imagefolder"  # the README's "your own folder": the file's phantom sizes are not the user's
    demo.data.root = "digits"
    assert unread_keys(demo.data, config_file("configs/demo.py").data) == []
    demo.data.synthetic.train_per_class = 10  # set on the command line for a source that is not used
    with pytest.raises(JaxmedError, match=r"data.synthetic.train_per_class=10 .*--config.data.format=synthetic"):
        check_read_keys(demo.data, config_file("configs/demo.py").data)
    npz = config_file("configs/demo.py")
    npz.data.class_names = ("a", "b")
    with pytest.raises(JaxmedError, match="data.class_names"):
        check_read_keys(npz.data, config_file("configs/demo.py").data)


def _saved_run(workdir: Path, step: int = 150, **changes):
    """A workdir as an interrupted jaxmed.main leaves it: config.json and a saved step."""
    config = config_file("tests/tiny_config.py")
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    (workdir / "checkpoints" / str(step)).mkdir(parents=True)
    return config


def test_resuming_with_a_changed_config_is_an_error_naming_the_keys(tmp_path):
    workdir = tmp_path / "run"
    _saved_run(workdir)
    stored = (workdir / "config.json").read_text()
    done = _main("--config", TINY, "--workdir", str(workdir), "--config.optim.lr=0.01", "--config.train.steps=16",
                 "--config.train.log_every_steps=5")
    error = _one_line_error(done, "optim.lr: 0.001 → 0.01", "train.steps: 8 → 16", "step 150", "new --workdir",
                            "--config.train.resume=ignore_changes")
    assert "log_every_steps" not in error  # logging cadence cannot change results
    assert (workdir / "config.json").read_text() == stored  # the run's record is left as it was


def test_ignore_changes_records_the_change_and_free_keys_pass(tmp_path):
    workdir = tmp_path / "run"
    config = _saved_run(workdir)
    config.train.log_every_steps = 3
    config.train.eval_batch_size = 4
    config.eval.bootstrap = 10
    config_history.check_resume(config, workdir)  # free keys only: no error, nothing recorded
    assert not (workdir / "config_history.json").exists()
    config.optim.lr = 0.01
    with pytest.raises(JaxmedError, match="optim.lr"):
        config_history.check_resume(config, workdir)
    config.train.resume = "ignore_changes"
    config_history.check_resume(config, workdir)
    history = json.loads((workdir / "config_history.json").read_text())
    assert history[0]["resumed_at_step"] == 150
    assert history[0]["changed"] == {"optim.lr": {"old": 0.001, "new": 0.01}}


def test_workdir_without_config_says_what_to_do_or_resumes_the_stored_config(tmp_path):
    done = _main("--workdir", str(tmp_path / "new"))
    _one_line_error(done, "--config is required unless", "existing run")
    done = _main("--workdir", str(tmp_path / "new"), "--config.train.epochs=2")
    _one_line_error(done, "--config.train.epochs needs --config FILE")

    from jaxmed.main import _stored_config

    workdir = tmp_path / "old"
    _saved_run(workdir)
    assert _stored_config(workdir).optim.lr == 0.001


NO_ACCOUNT_GCLOUD = """#!/bin/sh
echo "$@" >> "$GCLOUD_CALLS"
echo "ERROR: (gcloud.compute.tpus.tpu-vm.describe) You do not currently have an active account selected." >&2
exit 1
"""


def _tpu(tmp_path, *argv):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "gcloud").write_text(NO_ACCOUNT_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAXMED_TPU_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", GCLOUD_CALLS=str(tmp_path / "calls"))
    return subprocess.run([sys.executable, str(ROOT / "launch/tpu.py"), *argv, "--project", "p", "--zone", "z",
                           "--name", "t"], capture_output=True, text=True, env=env, timeout=60)


def test_tpu_status_without_a_gcloud_account_fails_with_gclouds_words(tmp_path):
    done = _tpu(tmp_path, "status")
    assert done.returncode != 0 and "NOT_FOUND" not in done.stdout
    assert "You do not currently have an active account selected" in done.stderr


def test_tpu_dry_run_is_accepted_before_the_subcommand(tmp_path):
    done = _tpu(tmp_path, "--dry-run", "status")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("gcloud compute tpus tpu-vm describe t")
    assert not (tmp_path / "calls").exists()  # printed, not run


def test_training_curves_are_readable_at_the_report_pages_width(tmp_path):
    from PIL import Image

    from jaxmed.evaluate import figures

    rows = [{"step": step, "train/loss": 1 / step, "train/accuracy": 0.5, "train/lr": 1e-3 / step}
            for step in range(1, 21)]
    rows += [{"step": step, "val/loss": 1 / step, "val/accuracy": 0.6, "val/recall/a": 0.5, "val/recall/b": 0.7}
             for step in (10, 20)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    figures.training_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    width, height = Image.open(tmp_path / "curves.png").size
    assert 1150 * height / width >= 500, (width, height)  # its height where report.html caps figures at 1150 px


def test_the_conversion_demo_has_its_own_workdir():
    from jaxmed import demo

    assert demo.parser().parse_args([]).workdir != Path("runs/demo")  # the training demo's (make demo)


def test_make_demo_runs_exactly_the_readmes_command():
    """`make demo` = the README's printed command (with the venv's python), in the user's own environment: no
    simulated devices added, since the best checkpoint and the test predictions depend on the device count."""
    makefile = (ROOT / "Makefile").read_text()
    lines = makefile.splitlines()
    recipe = lines[next(i for i, line in enumerate(lines) if line.startswith("demo:")) + 1].strip()
    assert recipe.startswith("$(PY) -m jaxmed.main ")
    command = "python" + recipe.removeprefix("$(PY)")
    readme = (ROOT / "README.md").read_text()
    assert f"{command}       # = make demo" in readme
    assert not any(line.startswith("export XLA_FLAGS") for line in lines)  # only the test target sets devices
    assert "test: export XLA_FLAGS ?= --xla_force_host_platform_device_count=8" in lines
