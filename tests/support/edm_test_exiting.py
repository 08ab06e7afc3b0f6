"""A handler module that calls sys.exit() at import (a script turned module)."""

from __future__ import annotations

import sys

sys.exit(3)
