"""``python -m experiments <sub-command> ...``: see :mod:`experiments.cli`."""

import sys

from experiments.cli import main

sys.exit(main())
