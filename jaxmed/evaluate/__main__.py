"""`python -m jaxmed.evaluate --workdir W [--split test|val] [--checkpoint best|latest|STEP]`."""

import sys

from jaxmed.evaluate.report import main

sys.exit(main())
