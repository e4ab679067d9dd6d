"""``python -m fedloom``: the ``fedloom`` command."""

import sys

from fedloom.cli import main

sys.exit(main())
