"""Record the command lines a shell snippet runs, to check a secret never appears on one.

Every external command a snippet may call is shadowed on ``PATH`` by a wrapper that appends
its argv to a log and then runs the real program. A key passed as an argument would be
readable by every local user (``ps``, ``/proc/<pid>/cmdline``) while the command runs.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

COMMANDS = ("curl", "date", "openssl", "python3", "sed")


def spy_path(folder: Path) -> tuple[str, Path]:
    """(a ``PATH`` with the wrappers first, the log file they append to)."""
    log = folder / "argv.log"
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    for name in COMMANDS:
        real = shutil.which(name)
        if real is None:
            continue
        wrapper = bin_dir / name
        script = f'#!/bin/sh\nprintf "%s\\n" "{name} $*" >> "{log}"\nexec "{real}" "$@"\n'
        wrapper.write_text(script)
        wrapper.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}", log
