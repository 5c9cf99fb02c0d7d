"""The configuration reference lists every variable Settings reads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from conveyor.settings import Settings

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_every_variable_is_documented() -> None:
    """Each AP_* field of Settings appears in docs/configuration.md."""
    text = DOC.read_text()
    missing = [
        f.metadata["env"]
        for f in dataclasses.fields(Settings)
        if f"`{f.metadata['env']}`" not in text
    ]
    assert missing == []
