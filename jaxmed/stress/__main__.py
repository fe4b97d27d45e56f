"""python -m jaxmed.stress --workdir W [--split test] [--checkpoint best] [--corruptions a,b] [--severities 1,2,3]

A run's checkpoint under acquisition artefacts (bias field, motion, ghosting, spike, noise, blur, gamma, JPEG,
resolution, contrast, brightness, rotation) at five severities → W/stress/<split>/ (stress.json, stress.md,
stress.html, figures)."""

from __future__ import annotations

import sys

from jaxmed.cli import OneLineParser, run_command
from jaxmed.stress import corruptions as jcorrupt


def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m jaxmed.stress", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="the run directory given to jaxmed.main")
    parser.add_argument("--split", default="test", help="the evaluated split: test (default) or val")
    parser.add_argument("--checkpoint", default="best", help="best (default), latest, or a step number")
    parser.add_argument("--corruptions", default="", help="comma-separated names (default: all): "
                        + ", ".join(jcorrupt.BY_NAME))
    parser.add_argument("--severities", default="1,2,3,4,5", help="comma-separated, of 1..5 (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seeds every corruption's randomness")

    def work(args):
        from jaxmed.distributed import maybe_initialize_distributed
        from jaxmed.errors import JaxmedError
        from jaxmed.stress.run import stress_workdir

        try:
            severities = [int(s) for s in args.severities.split(",") if s.strip()]
        except ValueError:
            raise JaxmedError(f"--severities {args.severities!r}: give numbers from 1 to 5, e.g. 1,3,5") from None
        maybe_initialize_distributed()
        names = [n.strip() for n in args.corruptions.split(",") if n.strip()]
        summary = stress_workdir(args.workdir, args.split, args.checkpoint, names, severities, args.seed)
        return {key: summary[key] for key in ("split", "checkpoint", "images", "BE_clean", "mBE", "mrBE", "failed")}

    return run_command(parser, argv, work)


if __name__ == "__main__":
    sys.exit(main())
