"""What every jaxmed command line shares: a usage error or a JaxmedError is one line on stderr and exit status 2
(people read it, not a traceback), and the last line on stdout is the command's JSON summary."""

from __future__ import annotations

import argparse
import json
import sys

from jaxmed.errors import JaxmedError


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are a JaxmedError naming --help, instead of the usage block and exit status 2."""

    def error(self, message):
        raise JaxmedError(f"{message} (see {self.prog} --help)")


def run_command(parser: argparse.ArgumentParser, argv, work, config_data: bool = False) -> int:
    """Parse `argv`, set up logging, print `work(args)`'s summary as JSON; 0, or 2 with one line for bad input.
    `config_data`: also take `--config.data.KEY=VALUE` arguments, as `args.config_data` (see `data_overrides`)."""
    try:
        if config_data:
            args, extra = parser.parse_known_args(argv)
            unknown = [argument for argument in extra if not argument.startswith("--config.")]
            if unknown:
                parser.error(f"unrecognized arguments: {' '.join(unknown)}")
            args.config_data = extra
        else:
            args = parser.parse_args(argv)
    except SystemExit as stop:  # --help
        return int(stop.code or 0)
    except JaxmedError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from jaxmed.distributed import setup_logging

    setup_logging()
    try:
        summary = work(args)
    except JaxmedError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary), flush=True)
    return 0


def data_overrides(extra: list[str], data) -> dict:
    """`--config.data.KEY=VALUE` arguments (where the data lives now, after a move) → {KEY: value of KEY's type}.

    Only data keys: the trained run's other keys describe the model it is and cannot change after training."""
    overrides = {}
    for argument in extra:
        key, equals, text = argument.partition("=")
        if not key.startswith("--config."):
            raise JaxmedError(f"unrecognized argument {argument} (see --help)")
        name = key.removeprefix("--config.data.")
        if not key.startswith("--config.data.") or not equals:
            raise JaxmedError(f"{argument}: only --config.data.KEY=VALUE may differ from the run's config (where "
                              "the data lives now); the other keys describe the trained model")
        if name not in data or hasattr(data[name], "keys"):
            raise JaxmedError(f"unknown data key {key}; valid keys: {', '.join(sorted(data.keys()))}")
        overrides[name] = _typed(text, data[name], key)
    return overrides


def check_read_by_source(overrides: dict, data) -> None:
    """Data overrides for reading the run's data again (evaluate): each must be one its data.format reads."""
    from jaxmed.data.source_keys import IGNORED_BY, readers

    if not overrides:
        return
    data_format = overrides.get("format", data.format)
    for name in overrides:
        if data_format in IGNORED_BY.get(name, ()):
            raise JaxmedError(f"--config.data.{name}: the run's data.format={data_format!r} does not read it (only "
                              f"{', '.join(readers(name))} do)")


def _typed(text: str, current, key: str):
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise JaxmedError(f"{key}={text}: expected true or false")
        return text.lower() in ("true", "1")
    try:
        if isinstance(current, (int, float)):
            return type(current)(text)
        if isinstance(current, (list, tuple)):
            value = json.loads(text)
            if not isinstance(value, list):
                raise ValueError("not a list")
            return tuple(value)
    except ValueError:
        raise JaxmedError(f"{key}={text}: expected a {type(current).__name__} like {current!r}") from None
    return text


# --- absl commands (jaxmed.main, jaxmed.aot): ml_collections' --config FILE and --config.KEY=VALUE -------------

def file_config(argv: list[str]):
    """The config file's own values, before --config.* overrides (None without --config)."""
    import importlib.util

    config_file = next((a.split("=", 1)[1] if "=" in a else argv[i + 1]
                        for i, a in enumerate(argv) if a.split("=")[0] == "--config" and (
                            "=" in a or i + 1 < len(argv))), None)
    if config_file is None:
        return None
    spec = importlib.util.spec_from_file_location("experiment_config", config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def file_config_missing(argv: list[str]) -> bool:
    """--config.x=y without --config FILE: absl would only say "Unknown command line flag"."""
    return (any(a.startswith("--config.") for a in argv)
            and not any(a.split("=")[0] == "--config" for a in argv))


def unknown_key_message(argv: list[str], error: Exception) -> str:
    """`--config.train.epoch=3` → name the bad key and list the valid ones at that level."""
    overrides = [a[len("--config."):].split("=")[0] for a in argv if a.startswith("--config.")]
    hint = " ".join(str(error).replace("\\n", " ").replace("\\", "").replace("'", "").split())
    config = file_config(argv)
    if config is None:
        if overrides:
            return (f"--config.{overrides[0]} needs --config FILE (configs/*.py); an existing run resumes with its "
                    "stored config and takes no overrides")
        return f"bad config override: {hint}"
    for override in overrides:
        node, parts = config, override.split(".")
        for depth, part in enumerate(parts):
            if not hasattr(node, "keys") or part not in node:
                where = ".".join(parts[:depth]) or "the config"
                valid = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(none: not a section)"
                return f"unknown config key --config.{override} ({hint}); valid keys of {where}: {valid}"
            node = node[part]
    return f"bad config override: {hint}"


def run_absl(main) -> None:
    """`app.run(main)`, with a bad --config.KEY=VALUE (or one without --config FILE) as one line and exit status 2
    naming the key and the valid keys at its level, instead of absl's traceback."""
    from absl import app, flags

    if file_config_missing(sys.argv):
        print(f"error: {unknown_key_message(sys.argv, ValueError())}", file=sys.stderr)
        sys.exit(2)
    try:
        app.run(lambda argv: sys.exit(main(argv)))
    except (flags.Error, AttributeError, KeyError) as error:  # raised while absl parses --config.x=y
        print(f"error: {unknown_key_message(sys.argv, error)}", file=sys.stderr)
        sys.exit(2)
