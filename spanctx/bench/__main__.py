"""``python -m spanctx.bench SCENARIO... --model M --device D --out DIR``."""

import sys

from .command import main

sys.exit(main())
