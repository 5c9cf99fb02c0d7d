"""``python -m conveyor`` runs the ``conveyor`` command."""

from __future__ import annotations

import sys

from conveyor.cli import main

sys.exit(main())
