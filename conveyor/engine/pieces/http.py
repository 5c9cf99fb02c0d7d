"""The http piece: one outgoing request with SSRF checks, manual redirects and a size cap.

Redirects are followed here, not by aiohttp, so every hop is re-checked (IP-literal hosts
before the request, names by the guarded connector at connect time) and credentials are not
carried to another origin. Every request carries ``Idempotency-Key: {run_id}:{step}``
because a step whose checkpoint was lost runs again on redelivery.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import aiohttp
import orjson
from yarl import URL

from conveyor.engine.context import RunEnv
from conveyor.engine.errors import StepFailed
from conveyor.engine.flow import HTTP_METHODS, Step

MAX_REDIRECTS: Final = 10
MAX_RESPONSE_BYTES: Final = 10 * 1024 * 1024
DEFAULT_TIMEOUT_S: Final = 30.0
_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
_CREDENTIAL_HEADERS: Final = frozenset({"authorization", "cookie", "proxy-authorization"})


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


async def http(env: RunEnv, step: Step, input: Any) -> tuple[Any, str]:
    """Send the request; output ``{status, headers (lower-cased), body (JSON parsed)}``."""
    session = env.services.http
    if session is None:
        raise StepFailed("no HTTP client is configured for http steps")
    policy = env.services.ssrf
    method = str(input.get("method", "GET")).upper()
    if method not in HTTP_METHODS:
        raise StepFailed(f"http method {method!r} is not supported")
    url_text = input.get("url")
    if not isinstance(url_text, str):
        raise StepFailed("http url must be text")
    try:
        url = URL(url_text)
    except ValueError as exc:
        raise StepFailed(f"invalid url {url_text!r}: {exc}") from None
    headers = _str_map(input.get("headers"), "headers")
    if not any(k.lower() == "idempotency-key" for k in headers):
        headers["Idempotency-Key"] = f"{env.ctx.run_id}:{step.name}"
    query = _str_map(input.get("query"), "query")
    data: bytes | None = None
    if "json" in input:
        data = orjson.dumps(input["json"])
        headers.setdefault("Content-Type", "application/json")
    elif input.get("body") is not None:
        body = input["body"]
        if isinstance(body, str):
            data = body.encode()
        else:
            data = orjson.dumps(body)
            headers.setdefault("Content-Type", "application/json")
    timeout_s = float(input.get("timeout_s") or DEFAULT_TIMEOUT_S)
    fail_on_error = input.get("fail_on_error", True) not in (False, "false")
    timeout = aiohttp.ClientTimeout(total=timeout_s)

    for _hop in range(MAX_REDIRECTS + 1):
        if url.scheme not in ("http", "https") or not url.host:
            raise StepFailed(f"http url must be http:// or https:// with a host, got {url}")
        if policy is not None:
            policy.check_url_host(url.host)
        try:
            async with session.request(
                method,
                url.update_query(query) if query else url,
                headers=headers,
                data=data,
                allow_redirects=False,
                timeout=timeout,
            ) as resp:
                location = resp.headers.get("Location")
                if resp.status in _REDIRECTS and location:
                    nxt = url.join(URL(location))
                    if resp.status == 303 or (resp.status in (301, 302) and method == "POST"):
                        method, data = "GET", None
                        headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
                    if nxt.origin() != url.origin():
                        headers = {
                            k: v for k, v in headers.items() if k.lower() not in _CREDENTIAL_HEADERS
                        }
                    url, query = nxt, {}
                    continue
                output = {
                    "status": resp.status,
                    "headers": _headers_out(resp),
                    "body": await _read_body(resp),
                }
        except TimeoutError:
            raise StepFailed(f"http {method} {url} timed out after {timeout_s:g} s") from None
        except aiohttp.ClientError as exc:
            raise StepFailed(f"http {method} {url} failed: {exc}") from None
        if fail_on_error and not 200 <= resp.status < 300:
            raise StepFailed(f"http {method} {url} answered {resp.status}", output=output)
        return output, ""
    raise StepFailed(f"http {method}: more than {MAX_REDIRECTS} redirects")
