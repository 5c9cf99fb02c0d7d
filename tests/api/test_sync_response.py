"""``sync_response``'s shortcut for a respond step's JSON answer without headers gives the
same response as the general path (which a framing header, dropped, sends it through)."""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from aiohttp import web

from conveyor.api.webhooks import sync_response

RUN_ID = "0190f0f0-0000-7000-8000-000000000000"


def _shape(resp: web.Response) -> tuple[Any, ...]:
    return (
        resp.status,
        list(resp.headers.items()),
        resp.body,
        resp.content_type,
        resp.charset,
    )


@pytest.mark.parametrize(
    "body",
    [
        {"total": 120},
        [1, "two", None],
        None,
        0,
        3.5,
        True,
        {"when": datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)},
        {"nested": {"é": "ü", "list": [{"a": 1}]}},
    ],
)
@pytest.mark.parametrize("status", [200, 201, "202", None, 0])
@pytest.mark.parametrize("headers", [{}, None])
def test_the_json_shortcut_is_the_general_answer(body: Any, status: Any, headers: Any) -> None:
    message = {"run_id": RUN_ID, "kind": "respond", "status": status, "body": body}
    short = sync_response(RUN_ID, {**message, "headers": headers})
    general = sync_response(RUN_ID, {**message, "headers": {"Content-Length": "1"}})
    assert _shape(short) == _shape(general)
    assert list(short.headers) == ["x-run-id", "Content-Type"]
    assert short.headers["Content-Type"] == "application/json"


def test_text_bodies_and_headers_keep_the_general_path() -> None:
    resp = sync_response(RUN_ID, {"kind": "respond", "status": 200, "headers": {}, "body": "plain"})
    assert resp.content_type == "text/plain" and resp.body == b"plain"
    resp = sync_response(
        RUN_ID,
        {"kind": "respond", "status": 200, "headers": {"X-A": "1"}, "body": {"a": 1}},
    )
    assert resp.headers["X-A"] == "1" and resp.headers["x-run-id"] == RUN_ID
