#!/usr/bin/env python3
"""jaxmed on Cloud TPU VMs: create (directly or through a queued resource, spot if you like), ship the code and
install it on every worker, run a command on all workers, tail the logs, copy results back, delete.
Every step is a plain gcloud command; `--dry-run` prints them instead of running them.

    launch/tpu.py up --accelerator v5litepod-8 --spot -- \\
        python -m jaxmed.main --config configs/brisc_vit.py --workdir gs://BUCKET/runs/brisc_vit

Settings come from flags or from the environment (JAXMED_TPU_PROJECT, JAXMED_TPU_ZONE, JAXMED_TPU_NAME,
JAXMED_TPU_ACCELERATOR, JAXMED_TPU_RUNTIME_VERSION); see launch/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# On every worker: the code, its .venv, logs/, data/ (from --data) and relative workdirs live here.
REMOTE_DIR = "~/jaxmed"
REMOTE_ARCHIVE = "jaxmed-code.tar.gz"  # relative to the worker's home, where scp puts it
LOG = "logs/run.log"
PID = "logs/run.pid"

# Accelerator-type prefix (as in v5litepod-8) → the TPU software version for JAX (Cloud TPU "TPU software
# versions": v4 and older use the plain Ubuntu base image).
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",  # v5e
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}

# Setting → the environment variable read when its flag is not given.
ENVIRONMENT = {
    "project": "JAXMED_TPU_PROJECT",
    "zone": "JAXMED_TPU_ZONE",
    "name": "JAXMED_TPU_NAME",
    "accelerator": "JAXMED_TPU_ACCELERATOR",
    "runtime_version": "JAXMED_TPU_RUNTIME_VERSION",
}


@dataclasses.dataclass(frozen=True)
class Resource:
    """What differs between a TPU VM created directly and one requested through a queued resource."""

    group: tuple[str, ...]  # the gcloud command group
    state_field: str  # where `describe` keeps the state
    ready: str
    waiting: frozenset  # on its way: wait
    dead: frozenset  # a spot/preemptible TPU cannot restart: delete it and create it again


DIRECT = Resource(("compute", "tpus", "tpu-vm"), "state", "READY", frozenset({"CREATING"}),
                  frozenset({"PREEMPTED", "TERMINATED"}))
QUEUED = Resource(("compute", "tpus", "queued-resources"), "state.state", "ACTIVE",
                  frozenset({"ACCEPTED", "CREATING", "PROVISIONING", "WAITING_FOR_RESOURCES"}),
                  frozenset({"FAILED", "SUSPENDING", "SUSPENDED"}))


class Refusal(Exception):
    """A setting is missing or wrong: say so and run nothing."""


class CommandFailed(Exception):
    pass


# ---------------------------------------------------------------------------------------------- gcloud commands

def _where(args) -> list[str]:
    return [f"--zone={args.zone}", f"--project={args.project}"]


def _resource(args) -> Resource:
    return QUEUED if getattr(args, "queued", False) else DIRECT


def create_command(args) -> list[str]:
    if args.queued:  # the queued resource and its single node share the name, so ssh/scp/delete need one name
        return ["gcloud", *QUEUED.group, "create", args.name, f"--node-id={args.name}", *_where(args),
                f"--accelerator-type={args.accelerator}", f"--runtime-version={args.runtime_version}",
                *(["--spot"] if args.spot else [])]
    return ["gcloud", *DIRECT.group, "create", args.name, *_where(args), f"--accelerator-type={args.accelerator}",
            f"--version={args.runtime_version}", *(["--spot"] if args.spot else []),
            *(["--preemptible"] if args.preemptible else [])]


def describe_command(args) -> list[str]:
    resource = _resource(args)
    return ["gcloud", *resource.group, "describe", args.name, *_where(args), f"--format=value({resource.state_field})"]


def delete_command(args) -> list[str]:
    # --force: a queued resource's node goes too; --quiet: no prompt
    return ["gcloud", *_resource(args).group, "delete", args.name, *_where(args),
            *(["--force"] if args.queued else []), "--quiet"]


def ssh_command(args, worker: str, script: str) -> list[str]:
    return ["gcloud", *DIRECT.group, "ssh", args.name, *_where(args), f"--worker={worker}", f"--command={script}"]


def scp_command(args, sources: list[str], destination: str, worker: str, recurse: bool = False) -> list[str]:
    return ["gcloud", *DIRECT.group, "scp", *sources, destination, *_where(args), f"--worker={worker}",
            *(["--recurse"] if recurse else [])]


# ------------------------------------------------------------------------------------------ scripts on workers

def _install(python: str) -> list[str]:
    # TPU VM images ship Ubuntu 22.04's Python 3.10; jaxmed needs >= 3.11, which uv fetches.
    return [f"cd {REMOTE_DIR}",
            "python3 -m pip install --user --quiet --upgrade uv",
            f"(test -x .venv/bin/python || ~/.local/bin/uv venv --python {shlex.quote(python)} .venv)",
            "~/.local/bin/uv pip install --python .venv/bin/python --quiet -e '.[tpu]'"]


def setup_script(args) -> str:
    if args.repo:
        fetch = [f"(test -d {REMOTE_DIR}/.git || git clone --quiet {shlex.quote(args.repo)} {REMOTE_DIR})",
                 f"git -C {REMOTE_DIR} fetch --quiet origin {shlex.quote(args.ref)}",
                 f"git -C {REMOTE_DIR} checkout --quiet --detach FETCH_HEAD"]
    else:
        fetch = [f"mkdir -p {REMOTE_DIR}", f"tar -xzf {REMOTE_ARCHIVE} -C {REMOTE_DIR}", f"rm {REMOTE_ARCHIVE}"]
    data = [f"mkdir -p data && gcloud storage rsync --recursive {shlex.quote(uri)} "
            f"{shlex.quote('data/' + _basename(uri))}" for uri in args.data]
    return " && ".join(fetch + _install(args.python) + data)


# A live (not zombie) process under the pid the last `run` wrote.
_RUNNING = f'ps -o stat= -p "$(cat {PID} 2>/dev/null)" 2>/dev/null | grep -qv Z'
_ALREADY_RUNNING = (f'if {_RUNNING}; then echo "jaxmed is already running on $(hostname) (pid $(cat {PID})): follow it '
                    'with launch/tpu.py logs, or end it with launch/tpu.py stop" >&2; exit 1; fi')


def run_script(command: list[str]) -> str:
    """Detached (setsid nohup), so it outlives the ssh session; appends to the worker's own log."""
    text = shlex.join(command)
    return "; ".join([
        f"cd {REMOTE_DIR} || exit 1",
        "mkdir -p logs",
        _ALREADY_RUNNING,
        ". .venv/bin/activate || exit 1",
        f"printf '=== %s %s\\n' \"$(date -u +%FT%TZ)\" {shlex.quote(text)} >> {LOG}",
        # JAXMED_DISTRIBUTED=1: jaxmed.main joins the slice's jax.distributed job (hosts found by the TPU runtime)
        f"JAXMED_DISTRIBUTED=1 setsid nohup {text} >> {LOG} 2>&1 < /dev/null & echo $! > {PID}",
        f'echo "jaxmed started on $(hostname), log: {REMOTE_DIR}/{LOG}"',
    ])


def stop_script() -> str:
    return "; ".join([
        f"cd {REMOTE_DIR} || exit 1",
        f'if {_RUNNING}; then kill -TERM "$(cat {PID})" && echo "SIGTERM sent on $(hostname): jaxmed saves a '
        'checkpoint and exits"; else echo "no jaxmed run on $(hostname)"; fi',
    ])


def stage_script(workdir: str, stage: str, with_checkpoints: bool) -> str:
    """Copy a VM-local workdir, without its checkpoints, to a staging directory that scp can fetch whole."""
    excludes = "" if with_checkpoints else " --exclude=./checkpoints --exclude=./best"
    return (f"cd {REMOTE_DIR} || exit 1; rm -rf ~/{stage} && mkdir -p ~/{stage} && "
            f"tar -C {shlex.quote(workdir)}{excludes} -cf - . | tar -C ~/{stage} -xf -")


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


# ---------------------------------------------------------------------------------------------------- running

class Runner:
    """Runs commands, echoing each to stderr; with --dry-run only prints them, one shell line each."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run

    def run(self, argv: list[str]) -> None:
        if self.dry_run:
            print(shlex.join(argv), flush=True)
            return
        print(f"+ {shlex.join(argv)}", file=sys.stderr, flush=True)
        code = subprocess.run(argv).returncode
        if code:
            raise CommandFailed(f"{argv[0]} exited with {code}: {shlex.join(argv)}")

    def state(self, argv: list[str]) -> str | None:
        """`describe`'s state, or None when the resource does not exist (or, with --dry-run, is unknown)."""
        if self.dry_run:
            print(shlex.join(argv), flush=True)
            return None
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode == 0:
            return done.stdout.strip() or None
        if "NOT_FOUND" in done.stderr:
            return None
        # no account, no permission, no such project...: gcloud's own words, not a resource that is "missing"
        reason = next((line for line in reversed(done.stderr.splitlines()) if line.strip()), "no message")
        raise CommandFailed(f"{argv[0]} exited with {done.returncode}: {reason.strip()} ({shlex.join(argv)})")

    def note(self, text: str) -> None:
        print(f"# {text}" if self.dry_run else text, file=sys.stdout if self.dry_run else sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ subcommands

def create(args, runner: Runner) -> None:
    runner.run(create_command(args))
    if args.queued:
        wait_until_ready(args, runner)


def wait_until_ready(args, runner: Runner) -> None:
    resource = _resource(args)
    if runner.dry_run:
        runner.run(describe_command(args))
        runner.note(f"(repeated every {args.poll_seconds:g} s until the state is {resource.ready})")
        return
    while (state := runner.state(describe_command(args))) != resource.ready:
        if state is None or state in resource.dead:
            again = "launch/tpu.py delete" + (" --queued" if args.queued else "")
            raise CommandFailed(f"{args.name} is {state or 'gone'} instead of {resource.ready}; delete it ({again}) "
                                "and try again, maybe in another zone")
        runner.note(f"{args.name}: {state}, waiting for {resource.ready}")
        time.sleep(args.poll_seconds)


def setup(args, runner: Runner) -> None:
    if not args.repo:
        archive = str(Path(tempfile.gettempdir()) / f"jaxmed-code-{args.name}.tar.gz")
        # committed code only: what runs on the VM is a commit you can name
        runner.run(["git", "-C", str(REPO), "archive", "--format=tar.gz", f"--output={archive}", args.ref])
        runner.run(scp_command(args, [archive], f"{args.name}:{REMOTE_ARCHIVE}", "all"))
    runner.run(ssh_command(args, "all", setup_script(args)))


def run(args, runner: Runner) -> None:
    runner.run(ssh_command(args, "all", run_script(args.command)))


def logs(args, runner: Runner) -> None:
    tail = ["tail", "-n", str(args.lines), *(["-F"] if args.follow else [])]
    runner.run(ssh_command(args, args.worker, f"{shlex.join(tail)} {REMOTE_DIR}/{LOG}"))


def stop(args, runner: Runner) -> None:
    runner.run(ssh_command(args, "all", stop_script()))


def copy_back(args, runner: Runner) -> None:
    name = _basename(args.workdir)
    if args.workdir.startswith("gs://"):
        excludes = [] if args.with_checkpoints else ["--exclude=^(checkpoints|best)/"]
        if not runner.dry_run:
            Path(args.to, name).mkdir(parents=True, exist_ok=True)
        runner.run(["gcloud", "storage", "rsync", "--recursive", *excludes, args.workdir, f"{args.to}/{name}"])
        return
    stage = f"jaxmed-results/{name}"  # worker 0 holds a VM-local workdir (one host; see launch/README.md)
    runner.run(ssh_command(args, "0", stage_script(args.workdir, stage, args.with_checkpoints)))
    if not runner.dry_run:
        Path(args.to).mkdir(parents=True, exist_ok=True)
    runner.run(scp_command(args, [f"{args.name}:{stage}"], args.to, "0", recurse=True))


def delete(args, runner: Runner) -> None:
    runner.run(delete_command(args))


def status(args, runner: Runner) -> None:
    state = runner.state(describe_command(args))
    if not runner.dry_run:
        print(state or "NOT_FOUND")


def preflight(args, runner: Runner) -> None:
    """Before paying for the slice: compile the command's config for it here (jaxmed.aot's deviceless TPU compiler)
    and refuse one that does not fit, naming the largest batch that does."""
    if args.no_preflight:
        return
    if runner.dry_run:
        runner.note("dry run: preflight skipped (it compiles the config here; run without --dry-run)")
        return
    sys.path.insert(0, str(REPO))
    try:
        from jaxmed.compile import targets
    except ImportError as error:
        raise Refusal(f"the preflight needs jaxmed installed here with its aot-tpu extra "
                      f"(pip install -e '.[aot-tpu]'): {error}; or pass --no-preflight") from None
    if args.accelerator not in targets.known_targets():
        runner.note(f"preflight skipped: jaxmed.aot knows no topology for {args.accelerator}")
        return
    targets.prepare_process()  # before jax starts
    from jaxmed.compile import preflight as aot_preflight
    from jaxmed.errors import JaxmedError

    runner.note(f"preflight: compiling the config for {args.accelerator} (python -m jaxmed.aot)")
    try:
        runner.note(aot_preflight.check(args.accelerator, args.command))
    except JaxmedError as error:
        raise Refusal(str(error)) from None


def up(args, runner: Runner) -> None:
    """Idempotent: create if missing (or re-create if preempted), then set up, then run. After a preemption the
    same command resumes training from the workdir's last checkpoint. First, unless --no-preflight, the
    command's config is compiled for the accelerator and refused if it does not fit."""
    preflight(args, runner)
    resource = _resource(args)
    state = runner.state(describe_command(args))
    if runner.dry_run:
        runner.note(f"dry run: assuming {args.name} does not exist yet")
    if state in resource.dead:
        runner.note(f"{args.name} is {state}: deleting it to create it again")
        runner.run(delete_command(args))
    if state is None or state in resource.dead:
        create(args, runner)
    elif state in resource.waiting:
        wait_until_ready(args, runner)
    elif state != resource.ready:
        raise CommandFailed(f"{args.name} is {state}; wait for it, or delete it (launch/tpu.py delete) and run up "
                            "again")
    setup(args, runner)
    run(args, runner)


# ------------------------------------------------------------------------------------------------- arguments

def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--project", help="Google Cloud project (env JAXMED_TPU_PROJECT)")
    common.add_argument("--zone", help="zone with TPU capacity, e.g. us-central2-b (env JAXMED_TPU_ZONE)")
    common.add_argument("--name", help="TPU VM name; also the queued resource's name (env JAXMED_TPU_NAME)")
    common.add_argument("--dry-run", action="store_true", help="print every command instead of running it")
    queued = argparse.ArgumentParser(add_help=False)
    queued.add_argument("--queued", action="store_true", help="through a queued resource (waits for capacity)")
    creation = argparse.ArgumentParser(add_help=False)
    creation.add_argument("--accelerator", help="accelerator type, e.g. v4-8, v5litepod-8, v5p-8, v6e-8 "
                                                "(env JAXMED_TPU_ACCELERATOR)")
    creation.add_argument("--runtime-version", help="TPU software version; default: the one for the generation "
                                                    "(env JAXMED_TPU_RUNTIME_VERSION)")
    capacity = creation.add_mutually_exclusive_group()
    capacity.add_argument("--spot", action="store_true", help="spot capacity: cheaper, preemptible at any time")
    capacity.add_argument("--preemptible", action="store_true", help="legacy preemptible TPU (direct create only)")
    creation.add_argument("--poll-seconds", type=float, default=30.0, help="queued resource: seconds between checks")
    shipping = argparse.ArgumentParser(add_help=False)
    shipping.add_argument("--repo", help="git URL to clone on the workers instead of copying `git archive` there")
    shipping.add_argument("--ref", default="HEAD", help="commit, branch or tag to ship (default HEAD)")
    shipping.add_argument("--data", action="append", default=[], metavar="GS_URI",
                          help="gs:// folder synced to ~/jaxmed/data/NAME on every worker (repeatable)")
    shipping.add_argument("--python", default="3.11", help="Python version for the workers' venv (default 3.11)")

    parser = argparse.ArgumentParser(
        prog="launch/tpu.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Settings missing from flags are read from JAXMED_TPU_PROJECT, JAXMED_TPU_ZONE, JAXMED_TPU_NAME, "
               "JAXMED_TPU_ACCELERATOR and JAXMED_TPU_RUNTIME_VERSION.\nThe command for `run` and `up` follows "
               "`--`. Details: launch/README.md.")
    # also before COMMAND (`launch/tpu.py --dry-run up ...`); its own dest, or the subcommand's default would win
    parser.add_argument("--dry-run", dest="dry_run_anywhere", action="store_true", help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")
    for handler, parents, help_text in [
        (create, [common, queued, creation], "create the TPU VM (or queue a request and wait until it is active)"),
        (setup, [common, shipping], "copy the code to every worker, install jaxmed[tpu], sync --data"),
        (run, [common], "start `-- COMMAND` on every worker in the background, logging to ~/jaxmed/logs"),
        (logs, [common], "tail a worker's log"),
        (stop, [common], "SIGTERM the run on every worker (it checkpoints and exits, as when preempted)"),
        (copy_back, [common], "copy a run's results (not its checkpoints) to this machine"),
        (delete, [common, queued], "delete the TPU VM or the queued resource"),
        (status, [common, queued], "print the TPU VM's (or queued resource's) state, or NOT_FOUND"),
        (up, [common, queued, creation, shipping],
         "create if missing or preempted, set up, run `-- COMMAND`: rerun it to resume after a preemption"),
    ]:
        name = handler.__name__.replace("_", "-")
        sub = commands.add_parser(name, parents=parents, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        if name == "up":
            sub.add_argument("--no-preflight", action="store_true",
                             help="skip compiling the config for the accelerator before creating the VM")
        if name == "logs":
            sub.add_argument("--worker", default="0", help="worker index, or all (default 0)")
            sub.add_argument("--lines", type=int, default=100, help="lines of history (default 100)")
            sub.add_argument("--no-follow", dest="follow", action="store_false", help="print and return")
        if name == "copy-back":
            sub.add_argument("workdir", help="the run's --workdir: gs://... or a path on the VM (relative to "
                                             "~/jaxmed)")
            sub.add_argument("--to", default="runs", help="local folder; the run lands in TO/NAME (default runs)")
            sub.add_argument("--with-checkpoints", action="store_true", help="also copy checkpoints/ and best/")
    return parser


def _resolve(args, command: list[str] | None) -> None:
    """Fill settings from the environment, then refuse anything missing or wrong before running a thing."""
    for key, variable in ENVIRONMENT.items():
        if hasattr(args, key) and getattr(args, key) is None:
            setattr(args, key, os.environ.get(variable) or None)
    needed = ("project", "zone", "name")
    if args.subcommand == "copy-back" and args.workdir.startswith("gs://"):
        needed = ()  # straight from the bucket: no VM involved
    missing = [f"--{key} (or {ENVIRONMENT[key]})" for key in needed if not getattr(args, key)]
    if hasattr(args, "accelerator") and not args.accelerator:
        missing.append(f"--accelerator (or {ENVIRONMENT['accelerator']})")
    if missing:
        raise Refusal(f"{args.subcommand} needs " + ", ".join(missing) + "; nothing was run")
    if hasattr(args, "accelerator"):
        generation, _, chips = args.accelerator.rpartition("-")
        if not generation or not chips.isdigit():
            raise Refusal(f"accelerator type {args.accelerator!r} is not GENERATION-SIZE, e.g. v5litepod-8")
        if args.runtime_version is None:
            if generation not in RUNTIME_VERSIONS:
                known = ", ".join(RUNTIME_VERSIONS)
                raise Refusal(f"unknown TPU generation {generation!r} in --accelerator {args.accelerator}: known "
                              f"are {known} (v5e is v5litepod); or pass --runtime-version for it")
            args.runtime_version = RUNTIME_VERSIONS[generation]
        if args.queued and args.preemptible:
            raise Refusal("queued resources take --spot, not --preemptible")
    for uri in getattr(args, "data", []):
        if not uri.startswith("gs://"):
            raise Refusal(f"--data {uri}: expected a gs:// folder (copy local data to a bucket with "
                          "`gcloud storage cp -r DIR gs://BUCKET/`)")
    if args.subcommand in ("run", "up"):
        if not command:
            raise Refusal(f"{args.subcommand} needs the command after --, e.g. `-- python -m jaxmed.main "
                          "--config configs/demo.py --workdir gs://BUCKET/runs/demo`")
        args.command = command
    elif command:
        raise Refusal(f"{args.subcommand} takes no command after --")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = None
    if "--" in argv:  # everything after -- is the command to run on the workers, untouched
        command, argv = argv[argv.index("--") + 1:], argv[:argv.index("--")]
    args = _parser().parse_args(argv)
    args.dry_run = args.dry_run or args.dry_run_anywhere
    try:
        _resolve(args, command)
        args.handler(args, Runner(args.dry_run))
    except Refusal as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except CommandFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except FileNotFoundError as error:
        print(f"error: {error.filename} is not on PATH (for gcloud: install the Google Cloud CLI, then "
              "`gcloud auth login`)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
