"""``python -m incseg`` runs the ``incseg`` command line."""

import sys

from incseg.cli import main

sys.exit(main())
