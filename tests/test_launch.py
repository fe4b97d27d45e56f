"""launch/tpu.py against a fake `gcloud` on PATH that records every call (one JSON line of argv each) and, when
asked, plays one TPU worker: `ssh --command` runs in bash with a scratch HOME, `scp` copies in and out of it."""

import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU = [sys.executable, str(ROOT / "launch/tpu.py")]
SETTINGS = ["--project", "p", "--zone", "z", "--name", "tpu1"]
WHERE = ["--zone=z", "--project=p"]
VM = ["compute", "tpus", "tpu-vm"]
QR = ["compute", "tpus", "queued-resources"]

FAKE_GCLOUD = '''#!{python}
import json, os, shutil, subprocess, sys

args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
if "describe" in args:  # states queued one per line in FAKE_GCLOUD_STATES; the last one stays
    path = os.environ.get("FAKE_GCLOUD_STATES", "")
    states = open(path).read().split() if os.path.exists(path) else ["NOT_FOUND"]
    if len(states) > 1:
        open(path, "w").write("\\n".join(states[1:]))
    if states[0] == "NOT_FOUND":
        sys.exit("ERROR: (gcloud) NOT_FOUND: tpu1")
    print(states[0])
home = os.environ.get("FAKE_TPU_HOME")
if home and args[3:4] == ["ssh"]:
    script = next(a for a in args if a.startswith("--command="))[len("--command="):]
    sys.exit(subprocess.run(["bash", "-c", script], cwd=home, env=dict(os.environ, HOME=home)).returncode)
if home and args[3:4] == ["scp"]:
    *sources, destination = [a for a in args[4:] if not a.startswith("--")]
    for source in sources:
        if ":" in source:  # from the worker into a local folder
            path = os.path.join(home, source.split(":", 1)[1])
            shutil.copytree(path, os.path.join(destination, os.path.basename(path)), dirs_exist_ok=True)
        else:
            shutil.copy(source, os.path.join(home, destination.split(":", 1)[1]))
'''


@pytest.fixture
def tpu(tmp_path):
    """Runs launch/tpu.py with the fake gcloud; returns (process, calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "gcloud"
    fake.write_text(FAKE_GCLOUD.format(python=sys.executable))
    fake.chmod(0o755)
    log = tmp_path / "gcloud-calls.jsonl"

    def launch(*argv, states=(), worker_home=None, env=None):
        if states:
            (tmp_path / "states").write_text("\n".join(states))
        environment = {k: v for k, v in os.environ.items() if not k.startswith("JAXMED_TPU_")}
        environment.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_GCLOUD_LOG=str(log),
                           FAKE_GCLOUD_STATES=str(tmp_path / "states"), TMPDIR=str(tmp_path), **(env or {}))
        if worker_home:
            environment["FAKE_TPU_HOME"] = str(worker_home)
        done = subprocess.run([*TPU, *argv], capture_output=True, text=True, env=environment, timeout=600)
        calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        log.unlink(missing_ok=True)
        return done, calls

    return launch


def _command(call):
    return next(a for a in call if a.startswith("--command="))[len("--command="):]


def _worker(tmp_path):
    """A worker's home after setup: ~/jaxmed with a venv whose activate script does nothing."""
    home = tmp_path / "worker"
    (home / "jaxmed/.venv/bin").mkdir(parents=True)
    (home / "jaxmed/.venv/bin/activate").write_text("")
    return home


def _wait_for(predicate, seconds=20.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _finished(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # an unreaped orphan counts as done
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("accelerator, runtime", [("v4-8", "tpu-ubuntu2204-base"),
                                                  ("v5litepod-16", "v2-alpha-tpuv5-lite"),
                                                  ("v5p-8", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e")])
def test_create_directly_with_the_generation_runtime(tpu, accelerator, runtime):
    done, calls = tpu("create", *SETTINGS, "--accelerator", accelerator)
    assert done.returncode == 0, done.stderr
    assert calls == [[*VM, "create", "tpu1", *WHERE, f"--accelerator-type={accelerator}", f"--version={runtime}"]]


def test_create_spot_preemptible_and_an_overridden_runtime(tpu):
    _, calls = tpu("create", *SETTINGS, "--accelerator", "v4-8", "--spot")
    assert calls == [[*VM, "create", "tpu1", *WHERE, "--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base",
                      "--spot"]]
    _, calls = tpu("create", *SETTINGS, "--accelerator", "v4-32", "--preemptible",
                   "--runtime-version", "v2-alpha-tpuv4")
    assert calls == [[*VM, "create", "tpu1", *WHERE, "--accelerator-type=v4-32", "--version=v2-alpha-tpuv4",
                      "--preemptible"]]


def test_queued_spot_create_waits_until_active(tpu):
    done, calls = tpu("create", *SETTINGS, "--queued", "--accelerator", "v5litepod-8", "--spot", "--poll-seconds", "0",
                      states=["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
    assert done.returncode == 0, done.stderr
    describe = [*QR, "describe", "tpu1", *WHERE, "--format=value(state.state)"]
    assert calls == [[*QR, "create", "tpu1", "--node-id=tpu1", *WHERE, "--accelerator-type=v5litepod-8",
                      "--runtime-version=v2-alpha-tpuv5-lite", "--spot"], describe, describe, describe]
    assert "WAITING_FOR_RESOURCES" in done.stderr


def test_a_failed_queued_resource_is_an_error(tpu):
    done, calls = tpu("create", *SETTINGS, "--queued", "--accelerator", "v6e-8", "--poll-seconds", "0",
                      states=["FAILED"])
    assert done.returncode == 1 and "tpu1 is FAILED" in done.stderr
    assert [call[3] for call in calls] == ["create", "describe"]


def test_setup_ships_a_git_archive_to_all_workers_and_installs_the_tpu_extra(tpu, tmp_path):
    done, calls = tpu("setup", *SETTINGS)
    assert done.returncode == 0, done.stderr
    archive = tmp_path / "jaxmed-code-tpu1.tar.gz"
    with tarfile.open(archive) as tar:
        assert {"pyproject.toml", "jaxmed/main.py", "launch/README.md"} <= set(tar.getnames())
    scp, ssh = calls
    assert scp == [*VM, "scp", str(archive), "tpu1:jaxmed-code.tar.gz", *WHERE, "--worker=all"]
    assert ssh[:-1] == [*VM, "ssh", "tpu1", *WHERE, "--worker=all"]
    assert _command(ssh) == (
        "mkdir -p ~/jaxmed && tar -xzf jaxmed-code.tar.gz -C ~/jaxmed && rm jaxmed-code.tar.gz && cd ~/jaxmed && "
        "python3 -m pip install --user --quiet --upgrade uv && "
        "(test -x .venv/bin/python || ~/.local/bin/uv venv --python 3.11 .venv) && "
        "~/.local/bin/uv pip install --python .venv/bin/python --quiet -e '.[tpu]'")


def test_setup_by_clone_with_data_from_a_bucket(tpu):
    done, calls = tpu("setup", *SETTINGS, "--repo", "https://example.org/jaxmed.git", "--ref", "v1",
                      "--data", "gs://bucket/brisc2025/", "--python", "3.12")
    assert done.returncode == 0, done.stderr
    [ssh] = calls  # no archive, no scp
    assert ssh[:-1] == [*VM, "ssh", "tpu1", *WHERE, "--worker=all"]
    assert _command(ssh) == (
        "(test -d ~/jaxmed/.git || git clone --quiet https://example.org/jaxmed.git ~/jaxmed) && "
        "git -C ~/jaxmed fetch --quiet origin v1 && git -C ~/jaxmed checkout --quiet --detach FETCH_HEAD && "
        "cd ~/jaxmed && python3 -m pip install --user --quiet --upgrade uv && "
        "(test -x .venv/bin/python || ~/.local/bin/uv venv --python 3.12 .venv) && "
        "~/.local/bin/uv pip install --python .venv/bin/python --quiet -e '.[tpu]' && "
        "mkdir -p data && gcloud storage rsync --recursive gs://bucket/brisc2025/ data/brisc2025")


def test_run_detaches_on_every_worker_logs_to_a_file_and_stop_sends_sigterm(tpu, tmp_path):
    home = _worker(tmp_path)
    hello = [sys.executable, "-c", "print('hello from the worker')"]
    done, calls = tpu("run", *SETTINGS, "--", *hello, worker_home=home)
    assert done.returncode == 0, done.stderr
    [ssh] = calls
    assert ssh[:-1] == [*VM, "ssh", "tpu1", *WHERE, "--worker=all"]
    detached = f"JAXMED_DISTRIBUTED=1 setsid nohup {shlex.join(hello)} >> logs/run.log 2>&1 < /dev/null & echo $! > logs/run.pid"
    assert detached in _command(ssh)
    log = home / "jaxmed/logs/run.log"
    _wait_for(lambda: log.exists() and "hello from the worker" in log.read_text())
    assert log.read_text().startswith("=== ") and shlex.join(hello) in log.read_text().splitlines()[0]

    done, calls = tpu("logs", *SETTINGS, "--worker", "all", "--lines", "5", "--no-follow", worker_home=home)
    assert calls == [[*VM, "ssh", "tpu1", *WHERE, "--worker=all", "--command=tail -n 5 ~/jaxmed/logs/run.log"]]
    assert "hello from the worker" in done.stdout

    _wait_for(lambda: _finished(int((home / "jaxmed/logs/run.pid").read_text())))
    done, _ = tpu("run", *SETTINGS, "--", "sleep", "30", worker_home=home)
    assert done.returncode == 0, done.stderr
    pid = int((home / "jaxmed/logs/run.pid").read_text())
    assert not _finished(pid)
    again, _ = tpu("run", *SETTINGS, "--", "sleep", "30", worker_home=home)
    assert again.returncode == 1 and "already running" in again.stderr  # one trainer per workdir, never two
    assert "jaxmed started" not in again.stdout

    done, calls = tpu("stop", *SETTINGS, worker_home=home)
    assert done.returncode == 0 and "SIGTERM sent" in done.stdout
    assert calls[0][:-1] == [*VM, "ssh", "tpu1", *WHERE, "--worker=all"]
    _wait_for(lambda: _finished(pid))


def test_logs_follow_worker_zero_by_default(tpu):
    _, calls = tpu("logs", *SETTINGS)
    assert calls == [[*VM, "ssh", "tpu1", *WHERE, "--worker=0", "--command=tail -n 100 -F ~/jaxmed/logs/run.log"]]


def test_copy_back_from_a_bucket_skips_checkpoints_and_needs_no_vm(tpu, tmp_path):
    done, calls = tpu("copy-back", "gs://bucket/runs/brisc_vit", "--to", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert calls == [["storage", "rsync", "--recursive", "--exclude=^(checkpoints|best)/", "gs://bucket/runs/brisc_vit",
                      f"{tmp_path}/out/brisc_vit"]]
    _, calls = tpu("copy-back", "gs://bucket/runs/brisc_vit/", "--with-checkpoints", "--to", str(tmp_path / "out"))
    assert calls == [["storage", "rsync", "--recursive", "gs://bucket/runs/brisc_vit/", f"{tmp_path}/out/brisc_vit"]]


def test_copy_back_from_the_vm_brings_reports_figures_and_exports_but_not_checkpoints(tpu, tmp_path):
    home = _worker(tmp_path)
    run = home / "jaxmed/runs/demo"
    for name in ("config.json", "metrics.jsonl", "eval/test/report.json", "eval/test/confusion_matrix.png",
                 "export/model.safetensors", "checkpoints/6/state/data", "best/6/state/data"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(name)
    out = tmp_path / "out"
    done, calls = tpu("copy-back", *SETTINGS, "runs/demo", "--to", str(out), worker_home=home)
    assert done.returncode == 0, done.stderr
    ssh, scp = calls
    assert ssh[:-1] == [*VM, "ssh", "tpu1", *WHERE, "--worker=0"]
    assert scp == [*VM, "scp", "tpu1:jaxmed-results/demo", str(out), *WHERE, "--worker=0", "--recurse"]
    copied = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert copied == ["demo/config.json", "demo/eval/test/confusion_matrix.png", "demo/eval/test/report.json",
                      "demo/export/model.safetensors", "demo/metrics.jsonl"]


def test_delete_a_vm_or_a_queued_resource(tpu):
    _, calls = tpu("delete", *SETTINGS)
    assert calls == [[*VM, "delete", "tpu1", *WHERE, "--quiet"]]
    _, calls = tpu("delete", *SETTINGS, "--queued")
    assert calls == [[*QR, "delete", "tpu1", *WHERE, "--force", "--quiet"]]


UP = ["up", *SETTINGS, "--accelerator", "v4-8", "--spot", "--no-preflight", "--", "python", "-m", "jaxmed.main",
      "--config", "configs/demo.py", "--workdir", "gs://bucket/runs/demo"]


@pytest.mark.parametrize("states, steps", [
    (["NOT_FOUND"], ["describe", "create", "scp", "ssh", "ssh"]),  # missing: create
    (["PREEMPTED"], ["describe", "delete", "create", "scp", "ssh", "ssh"]),  # spot VMs cannot restart: re-create
    (["READY"], ["describe", "scp", "ssh", "ssh"]),  # there: set up and run
])
def test_up_creates_only_what_is_missing_then_sets_up_and_runs(tpu, states, steps):
    done, calls = tpu(*UP, states=states)
    assert done.returncode == 0, done.stderr
    assert [call[3] for call in calls] == steps
    assert calls[0] == [*VM, "describe", "tpu1", *WHERE, "--format=value(state)"]
    if "create" in steps:
        assert calls[steps.index("create")] == [*VM, "create", "tpu1", *WHERE, "--accelerator-type=v4-8",
                                                "--version=tpu-ubuntu2204-base", "--spot"]
    assert "JAXMED_DISTRIBUTED=1 setsid nohup python -m jaxmed.main --config configs/demo.py --workdir gs://bucket/runs/demo" in _command(
        calls[-1])


def test_up_replaces_a_suspended_queued_resource_and_waits_for_it(tpu):
    done, calls = tpu(*UP[:1], "--queued", "--poll-seconds", "0", *UP[1:],
                      states=["SUSPENDED", "PROVISIONING", "ACTIVE"])
    assert done.returncode == 0, done.stderr
    assert [call[:4] for call in calls[:5]] == [[*QR, "describe"], [*QR, "delete"], [*QR, "create"], [*QR, "describe"],
                                                [*QR, "describe"]]
    assert calls[1] == [*QR, "delete", "tpu1", *WHERE, "--force", "--quiet"]
    assert [call[3] for call in calls[5:]] == ["scp", "ssh", "ssh"]


def test_up_refuses_a_vm_in_another_state(tpu):
    done, calls = tpu(*UP, states=["STOPPED"])
    assert done.returncode == 1 and "tpu1 is STOPPED" in done.stderr
    assert len(calls) == 1


@pytest.mark.parametrize("argv, message", [
    (["create", "--zone", "z", "--name", "n", "--accelerator", "v4-8"], "--project (or JAXMED_TPU_PROJECT)"),
    (["create", "--project", "p", "--name", "n", "--accelerator", "v4-8"], "--zone (or JAXMED_TPU_ZONE)"),
    (["run", "--project", "p", "--zone", "z", "--", "python"], "--name (or JAXMED_TPU_NAME)"),
    (["delete"], "--project (or JAXMED_TPU_PROJECT), --zone (or JAXMED_TPU_ZONE), --name (or JAXMED_TPU_NAME)"),
    (["create", *SETTINGS], "--accelerator (or JAXMED_TPU_ACCELERATOR)"),
    (["create", *SETTINGS, "--accelerator", "v9-8"], "unknown TPU generation 'v9'"),
    (["up", *SETTINGS, "--accelerator", "v5e-8", "--", "python"], "(v5e is v5litepod)"),
    (["create", *SETTINGS, "--accelerator", "v4"], "is not GENERATION-SIZE"),
    (["create", *SETTINGS, "--accelerator", "v4-8", "--queued", "--preemptible"], "take --spot, not --preemptible"),
    (["run", *SETTINGS], "needs the command after --"),
    (["setup", *SETTINGS, "--data", "/local/brisc"], "expected a gs:// folder"),
    (["logs", *SETTINGS, "--", "python"], "takes no command"),
])
def test_refusals_run_nothing(tpu, tmp_path, argv, message):
    done, calls = tpu(*argv)
    assert done.returncode == 2
    assert message in done.stderr and done.stderr.startswith("error: ")
    assert calls == [] and not list(tmp_path.glob("*.tar.gz"))


def test_an_unknown_generation_goes_with_an_explicit_runtime_version(tpu):
    done, calls = tpu("create", *SETTINGS, "--accelerator", "v9-8", "--runtime-version", "v2-alpha-tpuv9")
    assert done.returncode == 0, done.stderr
    assert calls == [[*VM, "create", "tpu1", *WHERE, "--accelerator-type=v9-8", "--version=v2-alpha-tpuv9"]]


def test_settings_from_the_environment_and_flags_win(tpu):
    env = {"JAXMED_TPU_PROJECT": "envp", "JAXMED_TPU_ZONE": "envz", "JAXMED_TPU_NAME": "envn",
           "JAXMED_TPU_ACCELERATOR": "v6e-8"}
    done, calls = tpu("create", env=env)
    assert done.returncode == 0, done.stderr
    assert calls == [[*VM, "create", "envn", "--zone=envz", "--project=envp", "--accelerator-type=v6e-8",
                      "--version=v2-alpha-tpuv6e"]]
    _, calls = tpu("create", "--zone", "z2", env=dict(env, JAXMED_TPU_RUNTIME_VERSION="custom"))
    assert calls == [[*VM, "create", "envn", "--zone=z2", "--project=envp", "--accelerator-type=v6e-8",
                      "--version=custom"]]


def test_dry_run_prints_every_command_and_runs_none(tpu, tmp_path):
    done, calls = tpu("up", "--dry-run", "--queued", *UP[1:])
    assert done.returncode == 0, done.stderr
    assert calls == [] and not list(tmp_path.glob("*.tar.gz"))
    printed = [shlex.split(line) for line in done.stdout.splitlines() if not line.startswith("#")]
    archive = str(tmp_path / "jaxmed-code-tpu1.tar.gz")
    describe = ["gcloud", *QR, "describe", "tpu1", *WHERE, "--format=value(state.state)"]
    assert printed[:5] == [
        describe,
        ["gcloud", *QR, "create", "tpu1", "--node-id=tpu1", *WHERE, "--accelerator-type=v4-8",
         "--runtime-version=tpu-ubuntu2204-base", "--spot"],
        describe,
        ["git", "-C", str(ROOT), "archive", "--format=tar.gz", f"--output={archive}", "HEAD"],
        ["gcloud", *VM, "scp", archive, "tpu1:jaxmed-code.tar.gz", *WHERE, "--worker=all"],
    ]
    assert [line[:9] for line in printed[5:]] == [["gcloud", *VM, "ssh", "tpu1", *WHERE, "--worker=all"]] * 2
    assert "--workdir gs://bucket/runs/demo" in printed[-1][-1]


def test_help():
    done = subprocess.run([*TPU, "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "copy-back" in done.stdout and "JAXMED_TPU_PROJECT" in done.stdout


TINY_RUN = ["--", "python", "-m", "jaxmed.main", "--config", str(ROOT / "tests/tiny_config.py"), "--workdir",
            "gs://bucket/runs/tiny"]


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (the aot-tpu extra) is not installed")
def test_up_compiles_the_config_first_and_goes_on_when_it_fits(tpu):
    done, calls = tpu("up", *SETTINGS, "--accelerator", "v5litepod-8", *TINY_RUN, states=["READY"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "preflight: fits v5litepod-8" in done.stderr
    assert [call[3] for call in calls] == ["describe", "scp", "ssh", "ssh"]


def _compiles_on_a_small_chip(config, name, options, path):
    """The preflight's compiler child (`isolated._compile_target`) on a v5e chip shrunk to 13 MiB of HBM."""
    import dataclasses

    from jaxmed.compile import isolated, targets

    real = targets.target
    targets.target = lambda name: dataclasses.replace(
        real(name), chip=dataclasses.replace(real(name).chip, hbm_bytes=13 * 2**20))
    isolated._compile_target(config, name, options, path)


def _dies_compiling(config, name, options, path):
    """The preflight's compiler child killed as libtpu 0.0.42.1 dies on ResNet-50 for v6e-8 (SIGSEGV)."""
    import signal

    os.kill(os.getpid(), signal.SIGSEGV)


def _launch_up(tmp_path, monkeypatch, child, accelerator, *command):
    """launch/tpu.py's main in-process with the fake gcloud, on `accelerator`, the preflight's compiler child
    replaced by `child`; returns (exit code, gcloud call log)."""
    from jaxmed.compile import isolated

    monkeypatch.setattr(isolated, "_compile_target", child)  # pickled by name into the spawned child
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin/gcloud"
    fake.write_text(FAKE_GCLOUD.format(python=sys.executable))
    fake.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_GCLOUD_LOG", str(log))
    spec = importlib.util.spec_from_file_location("launch_tpu", ROOT / "launch/tpu.py")
    launch = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "launch_tpu", launch)  # its dataclasses look their module up there
    spec.loader.exec_module(launch)
    return launch.main(["up", *SETTINGS, "--accelerator", accelerator, *TINY_RUN, *command]), log


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (the aot-tpu extra) is not installed")
def test_up_refuses_a_config_that_does_not_fit_and_names_the_largest_batch(tmp_path, monkeypatch, capsys):
    """On a v5e chip shrunk to 13 MiB of HBM (a config that overflows the real 16 GiB compiles for many minutes
    here), 64 images per chip of the tiny ViT do not fit; nothing is created."""
    code, log = _launch_up(tmp_path, monkeypatch, _compiles_on_a_small_chip, "v5litepod-8",
                           "--config.train.batch_size=512")
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert code == 2 and error, error
    assert "preflight: train/train needs" in error[0] and "at 64 images per device" in error[0]
    largest = int(error[0].split("the largest train batch that fits is ")[1].split()[0])
    assert 1 <= largest < 64 and f"--config.train.batch_size={largest * 8}" in error[0]
    assert not log.exists()  # no gcloud call: nothing described, nothing created


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (the aot-tpu extra) is not installed")
def test_a_compiler_crash_in_the_preflight_refuses_the_slice_and_launch_survives(tmp_path, monkeypatch, capsys):
    code, log = _launch_up(tmp_path, monkeypatch, _dies_compiling, "v6e-8")
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert code == 2 and error, error
    assert "does not compile for v6e-8: the compiler process died (SIGSEGV)" in error[0], error[0]
    assert "--no-preflight" in error[0]
    assert not log.exists()
