"""Entry point of the PyInstaller bundle: one executable, two commands.

``emloc-studio`` starts the app; the same executable started under the name ``emloc`` (a
symlink that ``build_bundle.sh`` makes next to it) is the command line.
"""

from __future__ import annotations

import multiprocessing
import os
import sys


def main() -> int:
    """Dispatch on the executable's name: ``emloc`` → CLI, anything else → the app."""
    multiprocessing.freeze_support()
    name = os.path.splitext(os.path.basename(sys.argv[0]))[0].lower()
    if name == "emloc":
        from emloc_engine.cli import main as cli_main

        return cli_main()
    from emloc_app.main import main as app_main

    return app_main()


if __name__ == "__main__":
    sys.exit(main())
