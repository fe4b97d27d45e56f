"""launch/tpu.py's preflight: before renting a TPU slice, compile the command's config for it and refuse one that
does not fit, naming the largest per-device batch that does."""

from __future__ import annotations

from jaxmed.errors import JaxmedError

# The refusal names a batch within 1/8 of the largest that fits: each step of the search is a full compile.
RESOLUTION = 1 / 8


def command_config(command: list[str]):
    """The experiment config of a `python -m jaxmed.main --config C [--config.key=value ...]` command, parsed as
    jaxmed.main parses it; None for any other command."""
    if "jaxmed.main" not in command or not any(arg.split("=")[0] == "--config" for arg in command):
        return None
    from absl import flags
    from ml_collections import config_flags

    config_args = []
    for index, arg in enumerate(command):
        if arg.startswith("--config.") or arg.startswith("--config="):
            config_args.append(arg)
        elif arg == "--config":
            config_args += [arg, command[index + 1]]
    argv = ["preflight", *config_args]
    values = flags.FlagValues()
    # sys_argv: config_flags finds the --config.key overrides to define in the argv it is given
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
    try:
        values(argv)
    except (flags.Error, AttributeError, KeyError) as error:
        raise JaxmedError(f"preflight: cannot read the command's config ({' '.join(str(error).split())})") from None
    return values.config


def check(accelerator: str, command: list[str]) -> str:
    """A one-line verdict when the config fits `accelerator`; a JaxmedError naming the largest fitting batch
    when it does not (or when a program does not compile)."""
    config = command_config(command)
    if config is None:
        return "preflight skipped: the command is not `python -m jaxmed.main --config ...`"
    from jaxmed.compile import isolated

    # in a child process, as `python -m jaxmed.aot`: a libtpu crash refuses the slice instead of killing launch
    records = isolated.compile_all(config, [accelerator], fit_batch=True, fit_only_if_needed=True,
                                   resolution=RESOLUTION)
    failed = [r for r in records if r.get("error")]
    if failed:
        raise JaxmedError(f"preflight: {failed[0].get('program') or 'the config'} does not compile for "
                          f"{accelerator}: {failed[0]['error']}; or pass --no-preflight")
    misfits = [r for r in records if not r["fits"]]
    if misfits:
        worst = max(misfits, key=lambda r: r["bytes_per_device"] or float("inf"))
        largest = next((r["largest_fitting_batch"] for r in records if "largest_fitting_batch" in r), None)
        devices = worst["devices"]
        hint = (f"the largest train batch that fits is {largest} per device (--config.train.batch_size="
                f"{largest * devices})" if largest else "no train batch fits")
        needs = (f"{worst['bytes_per_device'] / 2**30:.2f} GiB" if worst["bytes_per_device"] is not None
                 else f"more than the HBM (the compiler: {worst['out_of_memory']})")
        raise JaxmedError(f"preflight: {worst['program']} needs {needs} per device at {worst['per_device_batch']} "
                          f"images per device; {accelerator}'s {worst['hbm_bytes'] / 2**30:.0f} GiB chips fit "
                          f"95% of that at most; {hint}; or pass --no-preflight")
    peak = max(r["bytes_per_device"] for r in records)
    return (f"preflight: fits {accelerator} ({peak / 2**30:.2f} GiB per device at most, "
            f"{len(records)} programs compiled)")
