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


def run_command(parser: argparse.ArgumentParser, argv, work) -> int:
    """Parse `argv`, set up logging, print `work(args)`'s summary as JSON; 0, or 2 with one line for bad input."""
    try:
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
