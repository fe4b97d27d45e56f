"""`python -m jaxmed.compare W1 W2 [W3 ...] --out DIR`: are these finished runs different on the same test images?

The command line only; the work is in jaxmed/evaluate/compare.py (its docstring lists what DIR gets).
"""

from __future__ import annotations

import argparse
import sys

from jaxmed.cli import OneLineParser, run_command

_DESCRIPTION = """\
Compare finished runs on the images they were all evaluated on (W/eval/<split>/predictions.csv, paired by image id).

DIR gets comparison.json and comparison.md (each run's accuracy, balanced accuracy, Cohen's kappa, macro F1, macro
ROC AUC and per-class recall with bootstrap 95% intervals, and its parameters, train time and images/s from
W/train_summary.json), for every pair McNemar's exact test, paired-bootstrap intervals of the differences in
accuracy, balanced accuracy and macro AUC, and DeLong's AUC test for two classes; verdicts.txt (one line per pair),
roc_curves.png, differences.png and comparison.html. The last line printed is a JSON summary.
"""


def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m jaxmed.compare", description=_DESCRIPTION,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdirs", nargs="*", metavar="W", help="run directories trained by jaxmed.main (two or more)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where the comparison goes (created)")
    parser.add_argument("--split", default="test", help="the evaluated split to compare on (default: test)")
    parser.add_argument("--names", metavar="A,B,...", help="run names for tables and figures, comma-separated, one per "
                        "W in order (default: each workdir's basename)")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="R",
                        help="resamples for the 95%% intervals (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples (default: 0)")
    return run_command(parser, argv, _compare)


def _compare(args) -> dict:
    from jaxmed.evaluate.compare import compare

    return compare(args.workdirs, args.out, split=args.split, names=args.names, resamples=args.bootstrap,
                   seed=args.seed)


if __name__ == "__main__":
    sys.exit(main())
