"""``python -m rannc_py``: see :mod:`rannc_py.cli`."""

import sys

from rannc_py.cli import main

sys.exit(main())
