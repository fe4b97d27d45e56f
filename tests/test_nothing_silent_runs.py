"""Runs that end without a word, or with advice that cannot be followed: a one-class folder, Ctrl-C, a missing test
split, data that moved, a cross-validation parent given where one run is expected, an export over an old one."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from helpers_configs import config_file
from jaxmed import compare, experiment, export
from jaxmed.data.class_checks import check_classes
from jaxmed.errors import JaxmedError
from jaxmed.evaluate import report

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests/tiny_config.py")


def _env():
    # JAX_PLATFORMS=cpu: a CUDA plugin installed on a machine without a GPU prints its own traceback at start-up
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), XLA_FLAGS="", JAX_PLATFORMS="cpu")


def _main(*args):
    return [sys.executable, "-m", "jaxmed.main", "--config", TINY, *args]


def _error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr[-2000:]
    return lines[0]


def test_a_one_class_folder_is_an_error_before_the_first_step(tmp_path):
    for split in ("train", "test"):
        folder = tmp_path / "data" / split / "glioma"
        folder.mkdir(parents=True)
        for index in range(12):
            cv2.imwrite(str(folder / f"{index}.png"), np.full((32, 32), index * 20, np.uint8))
    config = config_file("tests/tiny_config.py")
    config.data.update(format="imagefolder", root=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(JaxmedError, match=r"train has images of 1 class\(es\) \(glioma\)"):
        experiment.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run/checkpoints").exists()  # no step was trained, so a rerun cannot resume into a crash


def _dataset(**labels):
    return SimpleNamespace(class_names=["a", "b", "c"],
                           splits={name: SimpleNamespace(labels=np.asarray(values)) for name, values in labels.items()})


def test_class_checks_name_the_split_and_class(caplog):
    with pytest.raises(JaxmedError, match=r"train has no images of class\(es\) c \(images in test\)"):
        check_classes(_dataset(train=[0, 1, 1], test=[0, 1, 2]))
    with caplog.at_level("WARNING", logger="jaxmed.data"):
        check_classes(_dataset(train=[0, 1, 2], val=[0, 1, 2], test=[0, 1]))
    assert "test has no images of class(es) c" in caplog.text


def test_ctrl_c_saves_and_exits_130(tmp_path):
    workdir = tmp_path / "run"
    process = subprocess.Popen(_main("--workdir", str(workdir), f"--config.data.cache_dir={tmp_path}/cache",
                                     "--config.train.steps=400", "--config.train.evaluate_test=False",
                                     "--config.train.eval_every_steps=200"),
                               env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ((workdir / "metrics.jsonl").exists() and '"step": 3,' in (workdir / "metrics.jsonl").read_text()):
        assert process.poll() is None and time.time() < deadline, process.stderr.read()[-2000:]
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    stopped = int(out.split("interrupted at step ")[1].split(":")[0])
    assert stopped < 400 and (workdir / "checkpoints" / str(stopped)).is_dir()
    assert "run the same command again to resume" in out


def test_a_second_ctrl_c_aborts_at_once(monkeypatch):
    from jaxmed.train.loop import _Preemption

    def exit_now(code):
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", exit_now)
    # default_int_handler in a shell's foreground; SIG_IGN where the shell started the tests in the background
    before = signal.getsignal(signal.SIGINT)
    with _Preemption() as preemption:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs between bytecodes of the main thread
        assert preemption.requested == "SIGINT"  # the first asks the loop to save; no KeyboardInterrupt
        with pytest.raises(SystemExit) as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
        assert stop.value.code == 130
    assert signal.getsignal(signal.SIGINT) is before  # Ctrl-C is itself again after training


@pytest.fixture(scope="module")
def no_test_split(tmp_path_factory):
    """The tiny run on data without a test split, as jaxmed.main trains it."""
    workdir = tmp_path_factory.mktemp("no_test") / "run"
    config = config_file("tests/tiny_config.py")
    config.data.synthetic.test_per_class = 0
    config.data.cache_dir = str(workdir.parent / "cache")
    config.train.async_checkpoints = False
    workdir.mkdir()
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    return workdir, experiment.train_and_evaluate(config, workdir)


def test_end_of_training_says_what_was_skipped_and_compare_advises_what_works(no_test_split, tmp_path, capsys):
    workdir, result = no_test_split
    assert "test" not in result and "no test split" in result["skipped"]["test"]
    assert any(line.startswith("skipped test: the data has no test split") for line in result["outcome"])
    other = tmp_path / "other"  # a second run of the same data: its config and splits are all compare reads first
    other.mkdir()
    for name in ("config.json", "splits.csv"):
        (other / name).write_text((workdir / name).read_text())
    assert compare.main([str(workdir), str(other), "--out", str(tmp_path / "cmp")]) == 2
    error = capsys.readouterr().err
    assert "its data has no test split" in error and "use --split val" in error
    assert "jaxmed.evaluate --workdir" not in error  # it would fail: there is no test split to evaluate


def test_evaluate_takes_where_the_data_lives_now_and_records_it(no_test_split, tmp_path, capsys):
    workdir, _ = no_test_split
    moved = tmp_path / "moved_cache"
    assert report.main(["--workdir", str(workdir), "--split", "val", f"--config.data.cache_dir={moved}"]) == 0
    assert json.loads((workdir / "eval/val/report.json").read_text())["data_overrides"] == {"cache_dir": str(moved)}
    assert moved.is_dir()
    assert report.main(["--workdir", str(workdir), "--config.data.root=elsewhere"]) == 2
    assert "data.format='synthetic' does not read it" in capsys.readouterr().err
    assert report.main(["--workdir", str(workdir), "--config.optim.lr=1"]) == 2
    assert "only --config.data.KEY=VALUE" in capsys.readouterr().err
    assert report.main(["--workdir", str(workdir)]) == 2  # the default split, test, is not there
    assert "no 'test' split" in capsys.readouterr().err


def test_predict_takes_data_overrides_with_a_workdir_and_records_them(no_test_split, tmp_path, capsys):
    from jaxmed import predict

    workdir, _ = no_test_split
    cv2.imwrite(str(tmp_path / "a.png"), np.full((40, 40, 3), 90, np.uint8))
    out = tmp_path / "out"
    assert predict.main([str(tmp_path / "a.png"), "--workdir", str(workdir), "--out", str(out),
                         "--config.data.dicom_frame=0"]) == 0
    assert json.loads((out / "summary.json").read_text())["data_overrides"] == {"dicom_frame": 0}
    assert predict.main([str(tmp_path / "a.png"), "--workdir", str(workdir), "--out", str(out),
                         "--config.model.dtype=bfloat16"]) == 2
    assert "only --config.data.KEY=VALUE" in capsys.readouterr().err


def _cv_parent(directory: Path) -> Path:
    """A cross-validation parent as jaxmed.main leaves it: W/config.json, W/fold_<k>/ runs, no checkpoint of its own."""
    directory.mkdir()
    (directory / "config.json").write_text(config_file("tests/tiny_config.py").to_json_best_effort())
    for fold in range(3):
        (directory / f"fold_{fold}" / "checkpoints" / "8").mkdir(parents=True)
    return directory


def test_a_cv_parent_lists_its_fold_runs_without_background_tracebacks(tmp_path, capsys):
    parent = _cv_parent(tmp_path / "cv")
    folds = f"{parent}/fold_0, {parent}/fold_1, {parent}/fold_2"
    assert export.main(["--workdir", str(parent), "--out", str(tmp_path / "hf")]) == 2
    assert folds in capsys.readouterr().err
    assert compare.main([str(parent), str(parent / "fold_0"), "--out", str(tmp_path / "c")]) == 2
    assert folds in capsys.readouterr().err
    # evaluate used to open orbax managers on the parent, whose threads printed tracebacks at exit after the error
    done = subprocess.run([sys.executable, "-m", "jaxmed.evaluate", "--workdir", str(parent)], env=_env(),
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 2
    assert "is a cross-validation parent" in _error_line(done.stderr) and folds in done.stderr
    assert not (parent / "checkpoints").exists() and not (parent / "best").exists()  # nothing created in it


def test_export_refuses_to_overwrite_unless_asked(tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert export.main(["--workdir", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert export.main(["--workdir", str(tmp_path / "nowhere"), "--out", str(out), "--overwrite"]) == 2
    assert "no checkpoints in" in capsys.readouterr().err  # past the --out check
