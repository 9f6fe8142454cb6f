"""``python -m iepnode.cli``: run the ``iepnode`` command."""

import sys

from iepnode.cli import main

sys.exit(main())
