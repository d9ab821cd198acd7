"""``python -m verification.bench``: the benchmark suite (also ``flownp bench``)."""

import sys

from verification.bench import main

sys.exit(main())
