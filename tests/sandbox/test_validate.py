"""validate_code: compiles and defines run(input), without executing anything."""

from __future__ import annotations

import pytest

from conveyor.sandbox import validate_code


@pytest.mark.parametrize(
    "code",
    [
        "def run(input):\n    return input\n",
        "async def run(input):\n    return 1\n",
        "import json\n\ndef run(data, extra=None):\n    return json.dumps(data)\n",
        "def run(*args):\n    return args\n",
    ],
)
def test_accepts_valid_code(code: str) -> None:
    """Sync and async run with one required positional argument pass."""
    assert validate_code(code) is None


@pytest.mark.parametrize(
    ("code", "fragment"),
    [
        ("", "empty"),
        ("def run(input)\n    return 1\n", "line 1"),
        ("return 1\n", "outside function"),
        ("x = 1\n", "must define a top-level function run"),
        ("run = lambda input: input\n", "must define a top-level function run"),
        ("class A:\n    def run(self, input):\n        pass\n", "top-level"),
        ("def run():\n    return 1\n", "one argument"),
        ("def run(a, b):\n    return 1\n", "exactly one"),
        ("def run(a, *, key):\n    return 1\n", "keyword-only"),
    ],
)
def test_rejects_with_a_message(code: str, fragment: str) -> None:
    """Each problem gets a one-line message saying what and where."""
    message = validate_code(code)
    assert message is not None and fragment in message
    assert "\n" not in message


def test_does_not_execute() -> None:
    """Validation never runs the module body."""
    assert validate_code("raise SystemExit('ran')\ndef run(input):\n    pass\n") is None
