from __future__ import annotations

import sys

from xlaserve.cli import main

sys.exit(main())
