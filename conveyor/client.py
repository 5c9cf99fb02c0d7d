"""A small synchronous client of the HTTP API, for the CLI's ``flows``, ``runs`` and ``secrets``.

It talks to a running Conveyor like any other client (``AP_HOST``/``AP_PORT``, with
``AP_API_KEY`` as bearer token), so the CLI works the same against a laptop and a cluster.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import orjson

from conveyor.errors import ConveyorError
from conveyor.settings import Settings


class ApiClientError(ConveyorError):
    """The API answered an error (``status``, ``code``, ``message``) or could not be reached."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{status} {code}: {message}" if status else f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details


class ApiClient:
    """Parameters: ``base_url`` like ``http://127.0.0.1:8080``; ``api_key`` or None;
    ``timeout_s`` per request (default 30)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 30) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s

    @classmethod
    def from_settings(cls, settings: Settings, base_url: str | None = None) -> ApiClient:
        host = settings.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return cls(base_url or f"http://{host}:{settings.port}", settings.api_key)

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: bytes | None = None,
        content_type: str | None = None,
    ) -> Any:
        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        body = data
        if json is not None:
            body = orjson.dumps(json)
            content_type = "application/json"
        if content_type:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(
            self.base_url + path, data=body, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                err = orjson.loads(raw)["error"]
                raise ApiClientError(
                    exc.code, err.get("code", ""), err.get("message", ""), err.get("details")
                ) from None
            except (orjson.JSONDecodeError, KeyError, TypeError):
                raise ApiClientError(
                    exc.code, "HTTP_ERROR", raw[:200].decode(errors="replace")
                ) from None
        except OSError as exc:
            reason = getattr(exc, "reason", None) or exc
            reason = getattr(reason, "strerror", None) or reason
            raise ApiClientError(
                0,
                "UNREACHABLE",
                f"cannot reach the API at {self.base_url} ({reason}); is `conveyor up` running "
                "there? Set --url, or AP_HOST/AP_PORT as the server has them",
            ) from None
        return orjson.loads(raw) if raw else None

    def paged(self, path: str) -> Iterator[dict[str, Any]]:
        """Every item of a listing, following ``next_cursor`` page by page (200 a page)."""
        sep = "&" if "?" in path else "?"
        cursor: str | None = None
        while True:
            query = f"{sep}limit=200" + (f"&cursor={quote(cursor)}" if cursor else "")
            page = self.request("GET", path + query)
            yield from page["data"]
            cursor = page.get("next_cursor")
            if not cursor:
                return
