"""``python -m selfattn``: the command line of :mod:`selfattn.cli`."""

import sys

from .cli import main

sys.exit(main())
