"""Flow templating: ``{{path}}`` look-ups into the run's data, and nothing else.

A template is a dotted/indexed path (``name(.key|[index])*``) over the run scope: ``trigger``,
``run``, ``secrets``, ``loop`` and the outputs of earlier steps. There is deliberately **no
expression evaluation** — no operators, calls, filters or attribute access — because
evaluating user text is the root of most workflow-engine CVEs; anything between ``{{`` and
``}}`` that is not a plain path is a syntax error. Templates are compiled once per flow
version into small renderer objects (:func:`compile_value`) so the hot path only walks dicts.

A string that is exactly one template keeps the referenced value's type; templates inside
longer text are interpolated, non-strings as JSON. :func:`redact` replaces secret values in
anything the engine records (keys included).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote, quote_plus

import orjson

from conveyor.engine.errors import StepFailed
from conveyor.errors import FlowValidationError

#: Roots that are not step names.
TRIGGER: Final = "trigger"
RUN: Final = "run"
SECRETS: Final = "secrets"
LOOP: Final = "loop"
RESERVED_ROOTS: Final = frozenset({TRIGGER, RUN, SECRETS, LOOP})
TRIGGER_KEYS: Final = ("method", "headers", "query", "body")
RUN_KEYS: Final = ("id", "flow_id", "version")
LOOP_KEYS: Final = ("item", "index")
REDACTED: Final = "***"

_TEMPLATE_RE: Final = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
# Dot keys allow '-' so headers such as ``trigger.headers.content-type`` work; anything else
# exotic goes in brackets: ``["x y"]``. No escapes inside quotes, on purpose: nothing to parse.
_PATH_RE: Final = re.compile(
    r"[A-Za-z_][A-Za-z0-9_]*"
    r"(?:\.[A-Za-z0-9_\-]+|\[-?[0-9]+\]|\[\"[^\"\[\]]*\"\]|\['[^'\[\]]*'\])*"
)
_SEGMENT_RE: Final = re.compile(
    r"\.(?P<key>[A-Za-z0-9_\-]+)|\[(?P<index>-?[0-9]+)\]|\[\"(?P<dq>[^\"]*)\"\]|\['(?P<sq>[^']*)'\]"
)

Segment = str | int


class TemplateSyntaxError(FlowValidationError, ValueError):
    """A ``{{...}}`` whose content is not a plain path (raised while compiling)."""


class TemplateError(StepFailed):
    """A template could not be resolved against the run's data (the step fails)."""


def _describe(root: str, segments: tuple[Segment, ...]) -> str:
    if not segments and root not in RESERVED_ROOTS:
        return f'step "{root}"'
    return root + "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in segments)


#: How error messages name a value's kind; first match wins (a bool is not "a number").
_KINDS: Final[tuple[tuple[Any, str], ...]] = (
    (bool, "a boolean"),
    (int | float, "a number"),
    (str, "a string"),
    (list | tuple, "a list"),
    (Mapping, "an object"),
)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    for kind, name in _KINDS:
        if isinstance(value, kind):
            return name
    return type(value).__name__


@dataclass(frozen=True, slots=True)
class Ref:
    """One parsed ``{{path}}``: ``root`` plus key/index ``segments``; ``text`` is the source."""

    text: str
    root: str
    segments: tuple[Segment, ...]

    def resolve(self, scope: Mapping[str, Any]) -> Any:
        """Look the path up in ``scope``; raise :class:`TemplateError` naming the full path."""
        try:
            cur = scope[self.root]
        except KeyError:
            raise TemplateError(self._missing_root()) from None
        for i, seg in enumerate(self.segments):
            try:
                if type(cur) is dict and type(seg) is str:  # JSON data: the common case
                    cur = cur[seg]
                elif isinstance(cur, Mapping):
                    cur = cur[seg if isinstance(seg, str) else str(seg)]
                elif isinstance(cur, list | tuple):
                    cur = cur[seg if isinstance(seg, int) else int(seg)]
                else:
                    where = _describe(self.root, self.segments[:i])
                    raise TemplateError(
                        f"template {self.text}: {where} is {_type_name(cur)}, "
                        f"cannot look up {_seg_text(seg)}"
                    )
            except (KeyError, IndexError, ValueError):
                where = _describe(self.root, self.segments[:i])
                if isinstance(cur, list | tuple):
                    msg = f"index {_seg_text(seg)} out of range in {where} (length {len(cur)})"
                elif self.root == SECRETS and i == 0:
                    msg = f'secret "{seg}" is not set'
                else:
                    msg = f'key "{seg}" not found in {where}'
                raise TemplateError(f"template {self.text}: {msg}") from None
        return cur

    def _missing_root(self) -> str:
        if self.root == LOOP:
            return f"template {self.text}: loop is only available inside a loop's steps"
        if self.root in RESERVED_ROOTS:
            return f"template {self.text}: {self.root} is not available"
        return f'template {self.text}: step "{self.root}" did not run or has no output'


def _seg_text(seg: Segment) -> str:
    return str(seg) if isinstance(seg, int) else f'"{seg}"'


def parse_ref(content: str, text: str | None = None) -> Ref:
    """Parse the inside of one ``{{...}}`` into a :class:`Ref` (no evaluation, ever)."""
    path = content.strip()
    shown = text if text is not None else "{{" + content + "}}"
    if not _PATH_RE.fullmatch(path):
        raise TemplateSyntaxError(
            f"template {shown} is not a path like name.key[0] (expressions are not supported)"
        )
    m = re.match(r"[A-Za-z_][A-Za-z0-9_]*", path)
    assert m is not None
    root = m.group(0)
    segments: list[Segment] = []
    for sm in _SEGMENT_RE.finditer(path, m.end()):
        if sm.group("key") is not None:
            segments.append(sm.group("key"))
        elif sm.group("index") is not None:
            segments.append(int(sm.group("index")))
        elif sm.group("dq") is not None:
            segments.append(sm.group("dq"))
        else:
            segments.append(sm.group("sq"))
    return Ref(text=shown, root=root, segments=tuple(segments))


def iter_refs(text: str) -> Iterator[Ref]:
    """Yield every template in ``text``; raises :class:`TemplateSyntaxError` on a bad one."""
    for m in _TEMPLATE_RE.finditer(text):
        yield parse_ref(m.group(1), m.group(0))
    if "{{" in _TEMPLATE_RE.sub("", text):
        raise TemplateSyntaxError(f"unclosed template in {text[:60]!r}")


def walk_strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """Yield ``(path, string)`` for every string inside a JSON-like value (validation aid)."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from walk_strings(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from walk_strings(v, f"{path}[{i}]")


# --- compiled renderers -------------------------------------------------------------------
# Plain classes with one ``render`` method: cheaper than closures to inspect and as fast.


class Renderer:
    """A compiled value; ``render(scope)`` produces the value with templates substituted."""

    __slots__ = ()
    constant: bool = False

    def render(self, scope: Mapping[str, Any]) -> Any:
        raise NotImplementedError


class _Const(Renderer):
    __slots__ = ("value",)
    constant = True

    def __init__(self, value: Any) -> None:
        self.value = value

    def render(self, scope: Mapping[str, Any]) -> Any:
        return self.value


class _Whole(Renderer):
    __slots__ = ("ref",)

    def __init__(self, ref: Ref) -> None:
        self.ref = ref

    def render(self, scope: Mapping[str, Any]) -> Any:
        return self.ref.resolve(scope)


def _to_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


class _Interp(Renderer):
    __slots__ = ("parts",)

    def __init__(self, parts: tuple[str | Ref, ...]) -> None:
        self.parts = parts

    def render(self, scope: Mapping[str, Any]) -> Any:
        return "".join(p if isinstance(p, str) else _to_text(p.resolve(scope)) for p in self.parts)


class _Dict(Renderer):
    __slots__ = ("items",)

    def __init__(self, items: tuple[tuple[str, Renderer], ...]) -> None:
        self.items = items

    def render(self, scope: Mapping[str, Any]) -> Any:
        # A loop, not a comprehension: in 3.11 that is a function call of its own.
        out = {}
        for k, r in self.items:
            out[k] = r.render(scope)
        return out


class _List(Renderer):
    __slots__ = ("items",)

    def __init__(self, items: tuple[Renderer, ...]) -> None:
        self.items = items

    def render(self, scope: Mapping[str, Any]) -> Any:
        return [r.render(scope) for r in self.items]


def compile_string(text: str) -> Renderer:
    """Compile one string: constant, a whole-value template, or interpolated text."""
    if "{{" not in text:
        return _Const(text)
    refs = list(iter_refs(text))
    m = _TEMPLATE_RE.fullmatch(text)
    if m is not None and len(refs) == 1:
        return _Whole(refs[0])
    parts: list[str | Ref] = []
    pos = 0
    for m in _TEMPLATE_RE.finditer(text):
        if m.start() > pos:
            parts.append(text[pos : m.start()])
        parts.append(parse_ref(m.group(1), m.group(0)))
        pos = m.end()
    if pos < len(text):
        parts.append(text[pos:])
    return _Interp(tuple(parts))


def compile_value(value: Any) -> Renderer:
    """Compile a JSON-like value; subtrees without templates collapse into one constant.

    Constants are returned as the same object on every render, so callers must treat
    rendered values as read-only (the engine never mutates them).
    """
    if isinstance(value, str):
        return compile_string(value)
    if isinstance(value, Mapping):
        items = tuple((str(k), compile_value(v)) for k, v in value.items())
        if all(r.constant for _, r in items):
            return _Const(dict(value))
        return _Dict(items)
    if isinstance(value, list | tuple):
        elems = tuple(compile_value(v) for v in value)
        if all(r.constant for r in elems):
            return _Const(list(value))
        return _List(elems)
    return _Const(value)


def render(value: Any, scope: Mapping[str, Any]) -> Any:
    """Compile and render in one go (convenience for tests and one-off use; not hot paths)."""
    return compile_value(value).render(scope)


# --- redaction ----------------------------------------------------------------------------


def redact(value: Any, secret_values: Iterable[str]) -> Any:
    """Return ``value`` with every occurrence of a secret value replaced by ``***``.

    Walks dicts (keys and values), lists and strings; other values are returned as they are.
    Matching ignores case and also catches the forms a secret takes once it passed through
    a URL, JSON or ``repr`` (percent-encoded, escaped), so an error message that echoes an
    upper-cased or encoded input still reveals nothing. Longer forms are replaced first so a
    secret containing another is not half-revealed. Empty secrets are ignored (they would
    match everywhere).
    """
    secrets = tuple(sorted({s for s in secret_values if s}))
    if not secrets:
        return value
    return _redact(value, _pattern(secrets))


@functools.lru_cache(maxsize=256)
def _pattern(secrets: tuple[str, ...]) -> re.Pattern[str]:
    forms: set[str] = set()
    for s in secrets:
        forms.update(
            (
                s,
                quote(s, safe=""),
                quote(s),
                quote_plus(s),
                orjson.dumps(s).decode()[1:-1],
                repr(s)[1:-1],
            )
        )
    ordered = sorted((f for f in forms if f), key=len, reverse=True)
    return re.compile("|".join(re.escape(f) for f in ordered), re.IGNORECASE)


def _redact(value: Any, pattern: re.Pattern[str]) -> Any:
    if isinstance(value, str):
        return pattern.sub(REDACTED, value)
    if isinstance(value, Mapping):
        out: dict[Any, Any] = {}
        for k, v in value.items():
            key = pattern.sub(REDACTED, k) if isinstance(k, str) else k
            if key in out:
                # Two keys that differ only by a secret: keep both, distinguishably.
                key = f"{key}#{len(out)}"
            out[key] = _redact(v, pattern)
        return out
    if isinstance(value, list | tuple):
        return [_redact(v, pattern) for v in value]
    return value
