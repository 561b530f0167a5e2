"""`python -m edge_runtime device ...`: the device CLI without the full edgemart composition root."""

import sys

from edge_runtime.cli import main

sys.exit(main())
