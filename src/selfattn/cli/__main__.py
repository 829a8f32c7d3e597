"""``python -m selfattn.cli``: the same command line as ``selfattn`` and ``python -m selfattn``."""

import sys

from . import main

sys.exit(main())
