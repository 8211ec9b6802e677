"""``python -m emloc_engine ...`` is the ``emloc`` CLI."""

import sys

from emloc_engine.cli import main

sys.exit(main())
