from __future__ import annotations

import sys

from edm.cli import main

sys.exit(main())
