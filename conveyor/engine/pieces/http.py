"""The http piece: one outgoing request with SSRF checks, manual redirects and a size cap.

Redirects are followed here, not by aiohttp, so every hop is re-checked (IP-literal hosts
before the request, names by the guarded connector at connect time). A hop to another origin
carries only the headers in :data:`CROSS_ORIGIN_HEADERS` and no body: whatever the flow put in
its headers (``X-Api-Key: {{secrets.TOKEN}}``) or body was meant for the first origin only.
Every request carries ``Idempotency-Key: {run_id}:{step}`` because a step whose checkpoint was
lost runs again on redelivery. Error messages name the method and the origin only, never a
rendered input (the path, query or method may come from a secret).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import aiohttp
import orjson
from yarl import URL

from conveyor.engine.errors import StepFailed
from conveyor.engine.schema import ANY, obj, step_schema
from conveyor.engine.spec import Checks, StepSpec, StepType, is_number, is_template

if TYPE_CHECKING:
    from conveyor.engine.context import RunEnv
    from conveyor.engine.flow import Step

HTTP_METHODS: Final = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
MAX_REDIRECTS: Final = 10
MAX_RESPONSE_BYTES: Final = 10 * 1024 * 1024
DEFAULT_TIMEOUT_S: Final = 30.0
_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
#: Headers a flow sets that survive a redirect to another origin (everything else is dropped).
CROSS_ORIGIN_HEADERS: Final = frozenset({"accept", "accept-language", "user-agent"})


def check_input(v: Checks, inp: Mapping[str, Any], p: str) -> None:
    """A URL is required; literal method, headers, query, timeout and flags are checked."""
    url = inp.get("url")
    if url is None:
        v.err(f"{p}.url", "is required")
    elif not isinstance(url, str):
        v.err(f"{p}.url", "must be text")
    elif not url.startswith("{{") and not re.match(r"(?i)https?://", url):
        v.err(f"{p}.url", "must be an http:// or https:// URL")
    method = inp.get("method", "GET")
    if not is_template(method) and (
        not isinstance(method, str) or method.upper() not in HTTP_METHODS
    ):
        v.err(f"{p}.method", f"must be one of {', '.join(sorted(HTTP_METHODS))}")
    if "json" in inp and "body" in inp:
        v.err(f"{p}.body", "give either json or body, not both")
    for key in ("headers", "query"):
        val = inp.get(key)
        if val is not None and not isinstance(val, Mapping) and not is_template(val):
            v.err(f"{p}.{key}", "must be an object")
    t = inp.get("timeout_s")
    if t is not None and not is_template(t) and (not is_number(t) or t <= 0):
        v.err(f"{p}.timeout_s", "must be a positive number of seconds")
    f = inp.get("fail_on_error")
    if f is not None and not isinstance(f, bool) and not is_template(f):
        v.err(f"{p}.fail_on_error", "must be true or false")


def _where(url: URL) -> str:
    """The URL as error messages show it: scheme, host and port only."""
    try:
        return str(url.origin())
    except ValueError:
        return "(invalid url)"


def _client_error(exc: aiohttp.ClientError) -> str:
    """An aiohttp error without the URL or anything else the flow rendered."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or type(exc.os_error).__name__}"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"{exc.status} {exc.message}"
    return type(exc).__name__


def _str_map(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise StepFailed(f"http {what} must be an object")
    out: dict[str, str] = {}
    for k, v in value.items():
        out[str(k)] = v if isinstance(v, str) else orjson.dumps(v).decode()
    return out


def _headers_out(resp: aiohttp.ClientResponse) -> dict[str, str]:
    headers: dict[str, str] = {}
    for k, v in resp.headers.items():
        key = k.lower()
        headers[key] = f"{headers[key]}, {v}" if key in headers else v
    return headers


async def _read_body(resp: aiohttp.ClientResponse) -> Any:
    if resp.content_length is not None and resp.content_length > MAX_RESPONSE_BYTES:
        raise StepFailed(f"http response larger than {MAX_RESPONSE_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(65536):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise StepFailed(f"http response larger than {MAX_RESPONSE_BYTES} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    ctype = resp.headers.get("Content-Type", "").lower()
    if "json" in ctype and raw:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return raw.decode(resp.charset or "utf-8", errors="replace")


def _same_origin(a: URL, b: URL) -> bool:
    try:
        return a.origin() == b.origin()
    except ValueError:
        return False


def _payload(input: Any, headers: dict[str, str]) -> bytes | None:
    """The request body from ``json`` or ``body`` (non-text bodies are sent as JSON)."""
    if "json" in input:
        headers.setdefault("Content-Type", "application/json")
        return orjson.dumps(input["json"])
    body = input.get("body")
    if body is None:
        return None
    if isinstance(body, str):
        return body.encode()
    headers.setdefault("Content-Type", "application/json")
    return orjson.dumps(body)


def _timeout_s(input: Any) -> float:
    try:
        timeout_s = float(input.get("timeout_s") or DEFAULT_TIMEOUT_S)
    except (TypeError, ValueError):
        raise StepFailed("http timeout_s must be a number of seconds") from None
    if not 0 < timeout_s < float("inf"):
        raise StepFailed("http timeout_s must be a positive number of seconds")
    return timeout_s


@dataclass(slots=True)
class _Request:
    """The request as it stands at the current hop (redirects change it)."""

    method: str
    url: URL
    headers: dict[str, str]
    query: dict[str, str]
    data: bytes | None
    #: The ``Idempotency-Key`` we add (``{run_id}:{step}``), kept across origins.
    own_key: str
    timeout_s: float

    @classmethod
    def from_input(cls, env: RunEnv, step: Step, input: Any) -> _Request:
        method = str(input.get("method", "GET")).upper()
        if method not in HTTP_METHODS:
            # Not echoed: a templated method may be a secret (or anything a caller sent).
            raise StepFailed(f"http method must be one of {', '.join(sorted(HTTP_METHODS))}")
        url_text = input.get("url")
        if not isinstance(url_text, str):
            raise StepFailed("http url must be text")
        try:
            url = URL(url_text)
        except ValueError:
            raise StepFailed("http url is not a valid URL") from None
        headers = _str_map(input.get("headers"), "headers")
        own_key = f"{env.ctx.run_id}:{step.name}"
        if not any(k.lower() == "idempotency-key" for k in headers):
            headers["Idempotency-Key"] = own_key
        query = _str_map(input.get("query"), "query")
        data = _payload(input, headers)
        return cls(method, url, headers, query, data, own_key, _timeout_s(input))

    def where(self) -> str:
        """``METHOD origin`` for error messages."""
        return f"{self.method} {_where(self.url)}"

    def follow(self, status: int, location: str) -> None:
        """Turn this request into the one a redirect to ``location`` asks for."""
        try:
            nxt = self.url.join(URL(location))
        except ValueError:
            raise StepFailed(f"http {self.where()} redirected to an invalid Location") from None
        if status == 303 or (status in (301, 302) and self.method == "POST"):
            self.method, self.data = "GET", None
            self.headers = {k: v for k, v in self.headers.items() if k.lower() != "content-type"}
        if not _same_origin(nxt, self.url):
            # The flow's headers and body were meant for the first origin only;
            # 307/308 keep the method, but the body stays behind too.
            self.headers = {
                k: v
                for k, v in self.headers.items()
                if k.lower() in CROSS_ORIGIN_HEADERS
                or (k.lower() == "idempotency-key" and v == self.own_key)
            }
            self.data = None
        self.url, self.query = nxt, {}


async def http(env: RunEnv, step: Step, input: Any) -> tuple[Any, str]:
    """Send the request; output ``{status, headers (lower-cased), body (JSON parsed)}``."""
    session = env.services.http
    if session is None:
        raise StepFailed("no HTTP client is configured for http steps")
    policy = env.services.ssrf
    req = _Request.from_input(env, step, input)
    fail_on_error = input.get("fail_on_error", True) not in (False, "false")
    timeout = aiohttp.ClientTimeout(total=req.timeout_s)

    for _hop in range(MAX_REDIRECTS + 1):
        url = req.url
        if url.scheme not in ("http", "https") or not url.host:
            raise StepFailed("http url must be http:// or https:// with a host")
        if policy is not None:
            policy.check_url_host(url.host)
        try:
            async with session.request(
                req.method,
                url.update_query(req.query) if req.query else url,
                headers=req.headers,
                data=req.data,
                allow_redirects=False,
                timeout=timeout,
            ) as resp:
                location = resp.headers.get("Location")
                if resp.status in _REDIRECTS and location:
                    req.follow(resp.status, location)
                    continue
                output = {
                    "status": resp.status,
                    "headers": _headers_out(resp),
                    "body": await _read_body(resp),
                }
        except TimeoutError:
            raise StepFailed(f"http {req.where()} timed out after {req.timeout_s:g} s") from None
        except aiohttp.ClientError as exc:
            raise StepFailed(f"http {req.where()} failed: {_client_error(exc)}") from None
        if fail_on_error and not 200 <= resp.status < 300:
            raise StepFailed(f"http {req.where()} answered {resp.status}", output=output)
        return output, ""
    raise StepFailed(f"http {req.method}: more than {MAX_REDIRECTS} redirects")


SPEC: Final = StepSpec(
    StepType.HTTP,
    input_keys=frozenset(
        {"method", "url", "headers", "query", "json", "body", "timeout_s", "fail_on_error"}
    ),
    check_input=check_input,
    piece=http,
    schema=step_schema(
        "http",
        "One outgoing request. Output: {status, headers, body}.",
        {
            "input": obj(
                {
                    "url": {"type": "string", "description": "http(s) URL or a template"},
                    "method": {
                        "type": "string",
                        "enum": ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
                        "default": "GET",
                    },
                    "headers": {"type": "object", "additionalProperties": True},
                    "query": {"type": "object", "additionalProperties": True},
                    "json": {**ANY, "description": "sent as JSON"},
                    "body": {**ANY, "description": "a string sent as is; not with json"},
                    "timeout_s": {"type": "number", "default": 30},
                    "fail_on_error": {"type": "boolean", "default": True},
                },
                ("url",),
                additionalProperties=False,
            )
        },
        ("input",),
    ),
)
