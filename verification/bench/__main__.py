"""``python -m verification.bench``: the benchmark suite (also ``flownp bench``)."""

import sys

from flownp.errors import UsageError
from verification.bench import main

try:
    sys.exit(main())
except UsageError as exc:  # e.g. an --out holding an earlier report: one line, exit 2
    print(f"python3 -m verification.bench: error: {exc}", file=sys.stderr)
    sys.exit(2)
