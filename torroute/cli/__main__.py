"""``python -m torroute.cli``: the ``torroute`` command."""

import sys

from . import main

sys.exit(main())
