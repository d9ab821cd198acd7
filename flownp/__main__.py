"""``python -m flownp`` = the ``flownp`` command."""

import sys

from flownp.cli import main

sys.exit(main())
