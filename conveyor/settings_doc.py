"""The variables reference of docs/configuration.md, rendered from the settings' declarations.

Every ``AP_*`` variable is declared once in :mod:`conveyor.settings` (variable, kind with its
bounds, default, help); this module turns those declarations into the Markdown table between
:data:`BEGIN` and :data:`END` and leaves the prose around it alone::

    python -m conveyor.settings_doc            # rewrite docs/configuration.md
    python -m conveyor.settings_doc --check    # exit 1 if it is out of date

``tests/test_settings_doc.py`` runs the check.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any

from conveyor.errors import ConfigError
from conveyor.settings import POSTGRES_PARTS, POSTGRES_PARTS_HELP, Settings
from conveyor.settings_kinds import PORT

BEGIN = "<!-- settings:begin -->"
END = "<!-- settings:end -->"
REGENERATE = "python -m conveyor.settings_doc"
DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
_NONE = "—"


class MarkersMissing(ConfigError):
    """The document has no (or a broken) ``BEGIN``/``END`` pair to render between."""


def _cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell (a ``|`` would end the cell)."""
    return text.replace("|", "\\|").replace("\n", " ")


def _code(value: str) -> str:
    return f"`{value}`"


def default_text(field: dataclasses.Field[Any]) -> str:
    """The default column: ``default_doc`` if declared, else the default as it is written."""
    described: str | None = field.metadata["default_doc"]
    if described is not None:
        return described
    value = field.default
    if value is None or value == ():
        return _NONE
    if isinstance(value, bool):
        return _code("true" if value else "false")
    if isinstance(value, Enum):
        return _code(str(value.value))
    return _code(str(value))


def allowed_text(field: dataclasses.Field[Any]) -> str:
    """The allowed column: what the variable's kind accepts (its error message's tail)."""
    allowed: str = field.metadata["kind"].allowed
    return allowed.removeprefix("expected ")


def _row(*cells: str) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def render_table() -> str:
    """The Markdown table of every variable, in declaration order."""
    lines = [_row("variable", "default", "allowed", "meaning"), "|---|---|---|---|"]
    for field in dataclasses.fields(Settings):
        env = field.metadata["env"]
        lines.append(
            _row(_code(env), default_text(field), allowed_text(field), field.metadata["help"])
        )
        if env == "AP_POSTGRES_URL":
            names = ", ".join(_code(env) for env, _ in POSTGRES_PARTS.values())
            defaults = ", ".join(_code(d) if d else _NONE for _, d in POSTGRES_PARTS.values())
            lines.append(
                _row(
                    names,
                    defaults,
                    f"text (the port: {PORT.allowed.removeprefix('expected ')})",
                    POSTGRES_PARTS_HELP,
                )
            )
    return "\n".join(lines)


def render(document: str) -> str:
    """``document`` with the text between :data:`BEGIN` and :data:`END` replaced by the table."""
    if document.count(BEGIN) != 1 or document.count(END) != 1:
        # A second pair would hold a table nobody checks (and --check would pass on it).
        raise MarkersMissing(f"expected exactly one {BEGIN} … {END} pair")
    head, _begin, rest = document.partition(BEGIN)
    _old, end, tail = rest.partition(END)
    if not end:
        raise MarkersMissing(f"expected {END} after {BEGIN}")
    note = f"<!-- generated from conveyor/settings.py by `{REGENERATE}`; edit the help there -->"
    return f"{head}{BEGIN}\n{note}\n\n{render_table()}\n\n{END}{tail}"


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite (or with ``--check``, verify) the document; 1 when a check finds it stale."""
    parser = argparse.ArgumentParser(prog=REGENERATE, description="Render the variables table.")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    parser.add_argument("--path", type=Path, default=DOC, help="default: %(default)s")
    args = parser.parse_args(argv)
    current = args.path.read_text()
    wanted = render(current)
    if wanted == current:
        return 0
    if args.check:
        print(f"{args.path} is out of date: run `{REGENERATE}`", file=sys.stderr)
        return 1
    args.path.write_text(wanted)
    print(f"{args.path} rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
