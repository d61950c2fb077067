"""``python -m sidecar`` is ``webhook-sidecar``."""

import sys

from .cli import main

sys.exit(main())
