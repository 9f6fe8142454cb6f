"""``python -m iepnode.cli``: run the ``iepnode`` command."""

import sys

from iepnode.cli import main

if __name__ == "__main__":  # not when a tool walks the package and imports every module
    sys.exit(main())
