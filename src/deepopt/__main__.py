"""``python -m deepopt``: the ``deepopt`` command, e.g. ``torchrun -m deepopt train``."""

import sys

from deepopt.cli import main

sys.exit(main())
