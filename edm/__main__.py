from __future__ import annotations

import sys

from edm.cli.main import main

sys.exit(main())
