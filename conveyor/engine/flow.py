"""The flow model: parse a flow document, validate it completely, compile it once.

:func:`parse_flow` turns a JSON/YAML document (DESIGN §3) into a frozen :class:`Flow` whose
steps carry their templates and branch conditions pre-compiled, so the executor never parses
or validates anything per run — callers cache one ``Flow`` per flow version. Validation
collects *every* problem with its path (``steps[3].then[0].input.url``) before raising one
:class:`~conveyor.engine.errors.FlowInvalid`; the checks for references between steps live in
:mod:`conveyor.engine.references`.
"""

from __future__ import annotations

import ast
import re
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
import yaml
from croniter import croniter

from conveyor.engine.conditions import Condition, check_condition, compile_condition
from conveyor.engine.errors import ErrorDetail, FlowInvalid
from conveyor.engine.references import check_references
from conveyor.engine.templating import (
    RESERVED_ROOTS,
    Renderer,
    TemplateSyntaxError,
    compile_value,
    iter_refs,
    walk_strings,
)

STEP_TYPES: Final = ("transform", "code", "http", "branch", "loop", "delay", "respond")
TRIGGER_TYPES: Final = ("webhook", "schedule", "manual")
NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_FLOW_NAME: Final = 200
MAX_RETRY_ATTEMPTS: Final = 10
MAX_BACKOFF_S: Final = 300.0
MAX_STEP_TIMEOUT_S: Final = 86_400.0
MAX_CODE_CHARS: Final = 1_000_000
#: Keys the API adds to a flow it returns; accepted and ignored so GET → edit → PUT works.
SERVER_FIELDS: Final = frozenset(
    {"id", "version", "enabled", "webhook_url", "sync_webhook_url", "created_at", "updated_at"}
)
_COMMON_KEYS: Final = frozenset({"name", "type", "retry", "continue_on_failure", "timeout_s"})
_TYPE_KEYS: Final[dict[str, frozenset[str]]] = {
    "transform": frozenset({"input"}),
    "code": frozenset({"input", "code"}),
    "http": frozenset({"input"}),
    "branch": frozenset({"when", "then", "else"}),
    "loop": frozenset({"items", "steps"}),
    "delay": frozenset({"input"}),
    "respond": frozenset({"input"}),
}
_INPUT_KEYS: Final[dict[str, frozenset[str]]] = {
    "http": frozenset(
        {"method", "url", "headers", "query", "json", "body", "timeout_s", "fail_on_error"}
    ),
    "delay": frozenset({"seconds"}),
    "respond": frozenset({"status", "headers", "body"}),
}
HTTP_METHODS: Final = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class Retry:
    """Per-step retry: ``attempts`` tries in total (1–10); waits ``backoff_s`` × 2ⁿ between."""

    attempts: int = 1
    backoff_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Trigger:
    """What starts a run: ``webhook`` (optional HMAC ``secret``), ``schedule``, ``manual``.

    ``secret`` is the raw text, usually ``{{secrets.NAME}}``; :attr:`secret_name` extracts
    NAME so ingest can look the value up. ``timezone`` defaults to UTC for schedules.
    """

    type: str
    secret: str | None = None
    cron: str | None = None
    timezone: str | None = None

    @property
    def secret_name(self) -> str | None:
        """NAME when ``secret`` is ``{{secrets.NAME}}``, else ``None``."""
        if self.secret is None or "{{" not in self.secret:
            return None
        ref = next(iter_refs(self.secret))
        return str(ref.segments[0]) if ref.segments else None

    def to_document(self) -> dict[str, Any]:
        """The trigger as it appears in a flow document."""
        doc: dict[str, Any] = {"type": self.type}
        if self.secret is not None:
            doc["secret"] = self.secret
        if self.cron is not None:
            doc["cron"] = self.cron
        if self.timezone is not None:
            doc["timezone"] = self.timezone
        return doc


@dataclass(frozen=True, slots=True, eq=False)
class Step:
    """One validated, compiled step. ``raw`` is the document it came from (for round trips).

    Compiled members: ``input_r`` (input renderer), ``when_c`` (branch condition),
    ``items_r`` (loop items renderer); nested steps in ``then``/``else_``/``steps``.
    """

    name: str
    type: str
    raw: Mapping[str, Any] = field(repr=False)
    input_r: Renderer = field(repr=False)
    code: str | None = None
    when_c: Condition | None = field(default=None, repr=False)
    then: tuple[Step, ...] = ()
    else_: tuple[Step, ...] = ()
    items_r: Renderer | None = field(default=None, repr=False)
    steps: tuple[Step, ...] = ()
    retry: Retry = Retry()
    continue_on_failure: bool = False
    timeout_s: float | None = None
    #: For loops: names whose outputs make up one iteration's ``{inner_step: output}``
    #: (direct children and steps in their branch arms; nested loops' insides excluded).
    iteration_names: tuple[str, ...] = ()

    def to_document(self) -> dict[str, Any]:
        """The step as a JSON-ready mapping (nested steps included)."""
        doc: dict[str, Any] = dict(self.raw)
        if self.type == "branch":
            doc["then"] = [s.to_document() for s in self.then]
            doc["else"] = [s.to_document() for s in self.else_]
        elif self.type == "loop":
            doc["steps"] = [s.to_document() for s in self.steps]
        # A deep copy: compiled constants share objects with the stored document.
        copy: dict[str, Any] = orjson.loads(orjson.dumps(doc))
        return copy


@dataclass(frozen=True, slots=True, eq=False)
class Flow:
    """A validated flow. ``secret_names`` lists every ``{{secrets.NAME}}`` it uses, so the
    worker loads (and redacts) only those; ``step_names`` covers nested steps too."""

    name: str
    trigger: Trigger
    steps: tuple[Step, ...]
    description: str | None = None
    secret_names: frozenset[str] = frozenset()
    step_names: frozenset[str] = frozenset()

    def to_document(self) -> dict[str, Any]:
        """Serialise back to a flow document that :func:`parse_flow` accepts unchanged."""
        doc: dict[str, Any] = {"name": self.name, "trigger": self.trigger.to_document()}
        if self.description is not None:
            doc["description"] = self.description
        doc["steps"] = [s.to_document() for s in self.steps]
        # A deep copy: compiled constants share objects with the stored document.
        copy: dict[str, Any] = orjson.loads(orjson.dumps(doc))
        return copy


#: Flow documents nest a few levels per branch or loop; deeper is a parser bomb, not a flow.
MAX_DOCUMENT_DEPTH: Final = 64


class _FlowYamlLoader(yaml.SafeLoader):
    """YAML without anchors/aliases (a few hundred bytes of nested aliases expand to
    gigabytes: "billion laughs") and with bounded nesting (no ``RecursionError``)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event: Any = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.YAMLError(
                f"aliases (*{event.anchor}) are not supported in flow documents"
                f" (line {event.start_mark.line + 1}); repeat the value instead"
            )
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if getattr(event, "anchor", None):
            raise yaml.YAMLError(
                f"anchors (&{event.anchor}) are not supported in flow documents"
                f" (line {event.start_mark.line + 1})"
            )
        depth = getattr(self, "_depth", 0)
        if depth >= MAX_DOCUMENT_DEPTH:
            raise yaml.YAMLError(f"nested deeper than {MAX_DOCUMENT_DEPTH} levels")
        self._depth = depth + 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth = depth


def load_document(text: str | bytes, content_type: str | None = None) -> Any:
    """Decode a flow document from JSON or YAML text.

    JSON is tried first unless ``content_type`` names YAML (JSON is valid YAML, but orjson is
    much faster). YAML anchors and aliases are refused and nesting is capped at
    :data:`MAX_DOCUMENT_DEPTH`. Raises :class:`FlowInvalid` with path ``""`` when it does not
    decode.
    """
    is_yaml = content_type is not None and "yaml" in content_type.lower()
    if not is_yaml:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            if content_type is not None and "json" in content_type.lower():
                raise FlowInvalid([{"path": "", "message": f"invalid JSON: {exc}"}]) from None
    try:
        return yaml.load(text, Loader=_FlowYamlLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise FlowInvalid([{"path": "", "message": f"invalid YAML: {exc}"}]) from None
    except (RecursionError, ValueError, OverflowError) as exc:
        raise FlowInvalid(
            [{"path": "", "message": f"invalid YAML: {type(exc).__name__}"}]
        ) from None


def _nul_paths(value: Any, path: str) -> list[str]:
    """Paths of every key or string in ``value`` that contains ``\\x00``."""
    found: list[str] = []
    if isinstance(value, str):
        if "\x00" in value:
            found.append(path)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            sub = f"{path}.{k}" if path else str(k)
            if "\x00" in str(k):
                found.append(sub.replace("\x00", "\\0"))
            found += _nul_paths(v, sub.replace("\x00", "\\0"))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _nul_paths(v, f"{path}[{i}]")
    return found


def _depth_ok(value: Any, limit: int) -> bool:
    """True when ``value`` nests at most ``limit`` containers deep (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth > limit:
            return False
        stack.extend((c, depth + 1) for c in children if isinstance(c, Mapping | list | tuple))
    return True


def parse_flow(document: Any) -> Flow:
    """Validate ``document`` (a mapping, or JSON/YAML text) and return the compiled flow.

    Raises :class:`FlowInvalid` listing every problem with its path.
    """
    if isinstance(document, str | bytes):
        document = load_document(document)
    if not _depth_ok(document, MAX_DOCUMENT_DEPTH):
        raise FlowInvalid(
            [{"path": "", "message": f"nested deeper than {MAX_DOCUMENT_DEPTH} levels"}]
        )
    # One JSON round trip: a deep copy the caller cannot mutate afterwards, YAML-only types
    # (dates, int keys) normalised to what the document looks like once stored as JSON.
    try:
        encoded = orjson.dumps(document, option=orjson.OPT_NON_STR_KEYS)
        document = orjson.loads(encoded)
    except (TypeError, RecursionError) as exc:
        raise FlowInvalid([{"path": "", "message": f"not representable as JSON: {exc}"}]) from None
    if b"\\u0000" in encoded:
        # PostgreSQL cannot store NUL in text or jsonb; say where it is instead of failing later.
        raise FlowInvalid(
            [{"path": p, "message": "contains a NUL character"} for p in _nul_paths(document, "")]
        )
    v = _Validator()
    v.check_document(document)
    errors = v.errors
    secret_names: set[str] = set()
    if isinstance(document, Mapping):
        ref_errors, secret_names = check_references(document)
        errors = errors + ref_errors
    if errors:
        raise FlowInvalid(errors)
    steps = tuple(_build_step(s) for s in document["steps"])
    trig = document["trigger"]
    trigger = Trigger(
        type=trig["type"],
        secret=trig.get("secret"),
        cron=trig.get("cron"),
        timezone=trig.get("timezone", "UTC" if trig["type"] == "schedule" else None),
    )
    return Flow(
        name=document["name"],
        trigger=trigger,
        steps=steps,
        description=document.get("description"),
        secret_names=frozenset(secret_names),
        step_names=frozenset(v.names),
    )


def _build_step(raw: Mapping[str, Any]) -> Step:
    retry_doc = raw.get("retry") or {}
    retry = Retry(
        attempts=int(retry_doc.get("attempts", 1)), backoff_s=float(retry_doc.get("backoff_s", 0))
    )
    typ = raw["type"]
    timeout = raw.get("timeout_s")
    return Step(
        name=raw["name"],
        type=typ,
        raw=raw,
        input_r=compile_value(raw.get("input", {})),
        code=raw.get("code"),
        when_c=compile_condition(raw["when"]) if typ == "branch" else None,
        then=tuple(_build_step(s) for s in raw.get("then") or ()),
        else_=tuple(_build_step(s) for s in raw.get("else") or ()),
        items_r=compile_value(raw["items"]) if typ == "loop" else None,
        steps=tuple(_build_step(s) for s in raw.get("steps") or ()),
        retry=retry,
        continue_on_failure=bool(raw.get("continue_on_failure", False)),
        timeout_s=float(timeout) if timeout is not None else None,
        iteration_names=tuple(_iteration_names(raw.get("steps") or ())) if typ == "loop" else (),
    )


def _iteration_names(steps: Any) -> list[str]:
    names: list[str] = []
    for s in steps:
        names.append(s["name"])
        if s["type"] == "branch":
            names += _iteration_names(s.get("then") or ())
            names += _iteration_names(s.get("else") or ())
    return names


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_template(v: Any) -> bool:
    return isinstance(v, str) and "{{" in v


class _Validator:
    """Structural checks; collects errors instead of stopping at the first one."""

    def __init__(self) -> None:
        self.errors: list[ErrorDetail] = []
        self.names: dict[str, str] = {}

    def err(self, path: str, message: str) -> None:
        self.errors.append({"path": path, "message": message})

    def check_document(self, doc: Any) -> None:
        if not isinstance(doc, Mapping):
            self.err("", "a flow document must be an object")
            return
        for key in doc:
            if key not in {"name", "trigger", "steps", "description"} | SERVER_FIELDS:
                self.err(str(key), "unknown key")
        name = doc.get("name")
        if not isinstance(name, str) or not name.strip():
            self.err("name", "is required (text, 1–200 characters)")
        elif len(name) > MAX_FLOW_NAME:
            self.err("name", f"is longer than {MAX_FLOW_NAME} characters")
        elif any(ord(c) < 32 or 0xD800 <= ord(c) <= 0xDFFF for c in name):
            self.err("name", "may not contain control characters (NUL, newline …)")
        desc = doc.get("description")
        if desc is not None and not isinstance(desc, str):
            self.err("description", "must be text")
        self.check_trigger(doc.get("trigger"))
        steps = doc.get("steps")
        if not isinstance(steps, list):
            self.err("steps", "is required (a list of steps)")
        else:
            self.check_steps(steps, "steps")

    def check_trigger(self, trig: Any) -> None:
        if not isinstance(trig, Mapping):
            self.err("trigger", "is required: {type: webhook|schedule|manual}")
            return
        typ = trig.get("type")
        if typ not in TRIGGER_TYPES:
            self.err(
                "trigger.type",
                f"unknown trigger type {typ!r}; expected webhook, schedule or manual",
            )
            return
        allowed = {"webhook": {"type", "secret"}, "schedule": {"type", "cron", "timezone"}}
        for key in trig:
            if key not in allowed.get(typ, {"type"}):
                self.err(f"trigger.{key}", f"unknown key for a {typ} trigger")
        if typ == "webhook" and "secret" in trig:
            self.check_trigger_secret(trig["secret"])
        if typ == "schedule":
            cron = trig.get("cron")
            if not isinstance(cron, str) or not cron.strip():
                self.err("trigger.cron", "is required for a schedule trigger")
            elif not croniter.is_valid(cron):
                self.err("trigger.cron", f"invalid cron expression {cron!r}")
            tz = trig.get("timezone", "UTC")
            try:
                if not isinstance(tz, str):
                    raise ValueError
                zoneinfo.ZoneInfo(tz)
            except (ValueError, zoneinfo.ZoneInfoNotFoundError):
                self.err("trigger.timezone", f"unknown time zone {tz!r}")

    def check_trigger_secret(self, secret: Any) -> None:
        if not isinstance(secret, str) or not secret:
            self.err("trigger.secret", "must be a secret reference {{secrets.NAME}}")
            return
        if "{{" not in secret:
            # A literal would sit in the flow document in plain text, shown to anyone who
            # can read flows; a reference keeps the value encrypted at rest.
            self.err(
                "trigger.secret",
                "must be a secret reference {{secrets.NAME}} (store the value with "
                "PUT /api/v1/secrets/NAME); literal secrets are not accepted",
            )
            return
        try:
            refs = list(iter_refs(secret))
        except TemplateSyntaxError as exc:
            self.err("trigger.secret", str(exc))
            return
        if (
            len(refs) != 1
            or refs[0].root != "secrets"
            or len(refs[0].segments) != 1
            or secret.strip() != refs[0].text
        ):
            self.err("trigger.secret", "may only be {{secrets.NAME}}")

    def check_steps(self, steps: Any, path: str) -> None:
        if not isinstance(steps, list):
            self.err(path, "must be a list of steps")
            return
        for i, step in enumerate(steps):
            self.check_step(step, f"{path}[{i}]")

    def check_step(self, step: Any, p: str) -> None:
        if not isinstance(step, Mapping):
            self.err(p, "a step must be an object")
            return
        name = step.get("name")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            self.err(f"{p}.name", "is required and must match [A-Za-z_][A-Za-z0-9_]*")
        elif name in RESERVED_ROOTS:
            self.err(f"{p}.name", f'"{name}" is reserved (trigger, loop, run, secrets)')
        elif name in self.names:
            self.err(
                f"{p}.name", f'duplicate step name "{name}" (first used at {self.names[name]})'
            )
        else:
            self.names[name] = p
        typ = step.get("type")
        if typ not in _TYPE_KEYS:
            self.err(
                f"{p}.type", f"unknown step type {typ!r}; expected one of {', '.join(STEP_TYPES)}"
            )
            return
        allowed = _COMMON_KEYS | _TYPE_KEYS[typ]
        for key in step:
            if key not in allowed:
                self.err(f"{p}.{key}", f"unknown key for a {typ} step")
        self.check_common(step, p)
        if "input" in step and not isinstance(step["input"], Mapping):
            self.err(f"{p}.input", "must be an object")
        elif typ in _INPUT_KEYS:
            self.check_input(typ, step.get("input") or {}, f"{p}.input")
        self.check_syntax(step.get("input"), f"{p}.input")
        if typ == "code":
            self.check_code(step.get("code"), f"{p}.code")
        elif typ == "branch":
            if "when" not in step:
                self.err(f"{p}.when", "is required for a branch step")
            else:
                for path, msg in check_condition(step["when"], f"{p}.when"):
                    self.err(path, msg)
                self.check_syntax(step["when"], f"{p}.when")
            self.check_steps(step.get("then", []), f"{p}.then")
            self.check_steps(step.get("else", []), f"{p}.else")
        elif typ == "loop":
            items = step.get("items")
            if items is None:
                self.err(f"{p}.items", "is required: a template yielding a list, or a list")
            elif not isinstance(items, list) and not _is_template(items):
                self.err(f"{p}.items", "must be a list or a template yielding a list")
            self.check_syntax(items, f"{p}.items")
            if "steps" not in step:
                self.err(f"{p}.steps", "is required for a loop step")
            else:
                self.check_steps(step["steps"], f"{p}.steps")

    def check_common(self, step: Mapping[str, Any], p: str) -> None:
        retry = step.get("retry")
        if retry is not None:
            if not isinstance(retry, Mapping):
                self.err(f"{p}.retry", "must be {attempts, backoff_s}")
            else:
                for key in retry:
                    if key not in ("attempts", "backoff_s"):
                        self.err(f"{p}.retry.{key}", "unknown key")
                att = retry.get("attempts", 1)
                if (
                    not isinstance(att, int)
                    or isinstance(att, bool)
                    or not 1 <= att <= MAX_RETRY_ATTEMPTS
                ):
                    self.err(f"{p}.retry.attempts", f"must be an integer 1–{MAX_RETRY_ATTEMPTS}")
                back = retry.get("backoff_s", 0)
                if not _is_number(back) or not 0 <= back <= MAX_BACKOFF_S:
                    self.err(f"{p}.retry.backoff_s", f"must be a number 0–{MAX_BACKOFF_S:g}")
        cof = step.get("continue_on_failure", False)
        if not isinstance(cof, bool):
            self.err(f"{p}.continue_on_failure", "must be true or false")
        t = step.get("timeout_s")
        if t is not None and (not _is_number(t) or not 0 < t <= MAX_STEP_TIMEOUT_S):
            self.err(
                f"{p}.timeout_s", f"must be a number of seconds, 0 < t ≤ {MAX_STEP_TIMEOUT_S:g}"
            )

    def check_input(self, typ: str, inp: Mapping[str, Any], p: str) -> None:
        for key in inp:
            if key not in _INPUT_KEYS[typ]:
                self.err(f"{p}.{key}", f"unknown input for a {typ} step")
        if typ == "http":
            url = inp.get("url")
            if url is None:
                self.err(f"{p}.url", "is required")
            elif not isinstance(url, str):
                self.err(f"{p}.url", "must be text")
            elif not url.startswith("{{") and not re.match(r"(?i)https?://", url):
                self.err(f"{p}.url", "must be an http:// or https:// URL")
            method = inp.get("method", "GET")
            if not _is_template(method) and (
                not isinstance(method, str) or method.upper() not in HTTP_METHODS
            ):
                self.err(f"{p}.method", f"must be one of {', '.join(sorted(HTTP_METHODS))}")
            if "json" in inp and "body" in inp:
                self.err(f"{p}.body", "give either json or body, not both")
            for key in ("headers", "query"):
                val = inp.get(key)
                if val is not None and not isinstance(val, Mapping) and not _is_template(val):
                    self.err(f"{p}.{key}", "must be an object")
            t = inp.get("timeout_s")
            if t is not None and not _is_template(t) and (not _is_number(t) or t <= 0):
                self.err(f"{p}.timeout_s", "must be a positive number of seconds")
            f = inp.get("fail_on_error")
            if f is not None and not isinstance(f, bool) and not _is_template(f):
                self.err(f"{p}.fail_on_error", "must be true or false")
        elif typ == "delay":
            sec = inp.get("seconds")
            if sec is None:
                self.err(f"{p}.seconds", "is required")
            elif not _is_template(sec) and (not _is_number(sec) or sec < 0):
                self.err(f"{p}.seconds", "must be a number of seconds ≥ 0")
        elif typ == "respond":
            st = inp.get("status", 200)
            if not _is_template(st) and (
                not isinstance(st, int) or isinstance(st, bool) or not 100 <= st <= 599
            ):
                self.err(f"{p}.status", "must be an HTTP status 100–599")
            h = inp.get("headers")
            if h is not None and not isinstance(h, Mapping) and not _is_template(h):
                self.err(f"{p}.headers", "must be an object")

    def check_code(self, code: Any, p: str) -> None:
        if not isinstance(code, str) or not code.strip():
            self.err(p, "is required: Python source defining run(input)")
            return
        if len(code) > MAX_CODE_CHARS:
            self.err(p, f"is longer than {MAX_CODE_CHARS} characters")
            return
        # Parse only, never execute: the worker must not run user code outside the sandbox.
        try:
            tree = ast.parse(code, filename="<step>", mode="exec")
            # Bytecode compilation (still no execution) catches what the parser lets through,
            # e.g. `return` or `await` outside a function.
            compile(tree, "<step>", "exec", dont_inherit=True)
        except SyntaxError as exc:
            self.err(p, f"does not compile: {exc.msg} (line {exc.lineno})")
            return
        except (ValueError, RecursionError, MemoryError) as exc:
            self.err(p, f"does not compile: {type(exc).__name__}: {exc}")
            return
        if not any(
            isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == "run"
            for n in tree.body
        ):
            self.err(p, "must define a top-level function run(input) (def or async def)")

    def check_syntax(self, value: Any, path: str) -> None:
        for p, text in walk_strings(value, path):
            if "{{" not in text:
                continue
            try:
                for _ in iter_refs(text):
                    pass
            except TemplateSyntaxError as exc:
                self.err(p, str(exc))
