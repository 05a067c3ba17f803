"""``python -m dashboards``: regenerate the provisioned dashboard JSON (``--check`` to verify)."""

from __future__ import annotations

import sys

from dashboards.generate import main

sys.exit(main())
