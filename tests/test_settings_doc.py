"""docs/configuration.md's variables table is the one rendered from conveyor/settings.py."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from conveyor import settings_doc
from conveyor.settings import POSTGRES_PARTS, Settings

FIELDS = dataclasses.fields(Settings)


def test_configuration_md_is_up_to_date() -> None:
    """The committed table equals the rendered one; if not, the message says how to fix it."""
    current = settings_doc.DOC.read_text()
    assert settings_doc.render(current) == current, (
        f"docs/configuration.md is out of date with conveyor/settings.py: run "
        f"`{settings_doc.REGENERATE}` and commit the result"
    )


def test_every_variable_has_a_row_with_its_default_and_bounds() -> None:
    """One row per declared variable (plus the PostgreSQL URL parts), bounds from the kind."""
    table = settings_doc.render_table()
    rows = {line.split(" | ")[0].removeprefix("| ") for line in table.splitlines()[2:]}
    parts = ", ".join(f"`{env}`" for env, _ in POSTGRES_PARTS.values())
    assert rows == {f"`{f.metadata['env']}`" for f in FIELDS} | {parts}
    assert "| `AP_WORKER_CONCURRENCY` | `1` | an integer from 1 to 10000 |" in table
    assert "| `AP_LOG_PRETTY` | `false` | true or false |" in table
    assert "| `AP_PM2_INSTANCES` | number of cores |" in table


def test_derived_and_meaningful_none_defaults_are_described() -> None:
    """A default computed from other variables is described in words, never shown as a value."""
    undescribed = [
        f.metadata["env"]
        for f in FIELDS
        if f.metadata["derive"] is not None and not f.metadata["default_doc"]
    ]
    assert undescribed == []


def test_prose_around_the_markers_is_kept() -> None:
    """Only the text between the markers changes; a document without them is refused."""
    doc = f"# Title\n\nintro\n\n{settings_doc.BEGIN}\nstale\n{settings_doc.END}\n\nafter\n"
    out = settings_doc.render(doc)
    assert out.startswith("# Title\n\nintro\n\n") and out.endswith(f"{settings_doc.END}\n\nafter\n")
    assert "stale" not in out and settings_doc.render(out) == out
    with pytest.raises(settings_doc.MarkersMissing):
        settings_doc.render("# no markers\n")
    # A second pair would hold a stale table that --check never looks at.
    twice = out + f"{settings_doc.BEGIN}\nstale\n{settings_doc.END}\n"
    with pytest.raises(settings_doc.MarkersMissing, match="exactly one"):
        settings_doc.render(twice)
    with pytest.raises(settings_doc.MarkersMissing):
        settings_doc.render(f"{settings_doc.END}\n{settings_doc.BEGIN}\n")


def test_check_fails_on_a_stale_copy_and_the_script_rewrites_it(tmp_path: Path) -> None:
    """``--check`` exits 1 naming the command; without it the file is rewritten, then passes."""
    stale = tmp_path / "configuration.md"
    stale.write_text(f"intro\n{settings_doc.BEGIN}\n| old |\n{settings_doc.END}\n")
    cmd = [sys.executable, "-m", "conveyor.settings_doc", "--path", str(stale)]
    check = subprocess.run([*cmd, "--check"], capture_output=True, text=True, check=False)
    assert check.returncode == 1 and settings_doc.REGENERATE in check.stderr
    assert subprocess.run(cmd, capture_output=True, check=False).returncode == 0
    assert "| old |" not in stale.read_text() and "`AP_LOG_LEVEL`" in stale.read_text()
    again = subprocess.run([*cmd, "--check"], capture_output=True, check=False)
    assert again.returncode == 0


def test_the_renderer_imports_no_http_layer() -> None:
    """Rendering the doc needs the settings only, not the API or the board."""
    code = (
        "import sys, conveyor.settings_doc\n"
        "print(sorted(m for m in sys.modules if m.startswith(('conveyor.api', 'conveyor.board'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
