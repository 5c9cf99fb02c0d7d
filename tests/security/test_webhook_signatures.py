"""Issue 10, finding 5: webhook signatures are references, timestamped, and seen once.

``X-Conveyor-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">`` within 5
minutes of the server's clock; the same signed request a second time is refused (409); the
untimed ``sha256=`` form only with ``AP_WEBHOOK_LEGACY_SIGNATURES=true``; a literal
``trigger.secret`` is refused when the flow is saved.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import shutil
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from conveyor.queue import keys
from tests.api.conftest import make_client
from tests.argv_spy import spy_path

__all__ = ["make_client"]

Client = TestClient[Any, Any]
SECRET = "whsec-9f8e7d"
SIGNED = {
    "name": "signed",
    "trigger": {"type": "webhook", "secret": "{{secrets.HOOK}}"},
    "steps": [{"name": "t", "type": "transform", "input": {"b": "{{trigger.body}}"}}],
}


def sign(body: bytes, t: int | None = None, secret: str = SECRET) -> str:
    """The header a sender computes (the README's example, in Python)."""
    stamp = str(int(time.time()) if t is None else t)
    mac = hmac.new(secret.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={stamp},v1={mac}"


async def _signed_flow(client: Client) -> str:
    resp = await client.put("/api/v1/secrets/HOOK", json={"value": SECRET})
    assert resp.status in (200, 201)
    resp = await client.post("/api/v1/flows", json=SIGNED)
    assert resp.status == 201, await resp.text()
    return str((await resp.json())["id"])


async def _post(client: Client, fid: str, body: bytes, **headers: str) -> Any:
    return await client.post(
        f"/api/v1/webhooks/{fid}",
        data=body,
        headers={"Content-Type": "application/json", **headers},
    )


async def test_literal_trigger_secret_is_refused(make_client: Any) -> None:
    """A literal trigger.secret fails validation with a FLOW_INVALID path error."""
    client: Client = await make_client(AP_CONTAINER_TYPE="APP")
    doc = {**SIGNED, "trigger": {"type": "webhook", "secret": "hunter2"}}
    resp = await client.post("/api/v1/flows", json=doc)
    assert resp.status == 422
    err = (await resp.json())["error"]
    assert err["code"] == "FLOW_INVALID"
    assert [d["path"] for d in err["details"]] == ["trigger.secret"]
    assert "hunter2" not in await resp.text()


async def test_timestamped_signature_accepted_once(make_client: Any, redis: aioredis.Redis) -> None:
    """A fresh signature is accepted; the identical request again is a 409 replay."""
    client: Client = await make_client(AP_CONTAINER_TYPE="APP")
    fid = await _signed_flow(client)
    body = b'{"order": 1}'
    header = sign(body)
    first = await _post(client, fid, body, **{"X-Conveyor-Signature": header})
    assert first.status == 202, await first.text()
    again = await _post(client, fid, body, **{"X-Conveyor-Signature": header})
    assert again.status == 409
    assert (await again.json())["error"]["code"] == "SIGNATURE_REPLAYED"
    digest = header.partition("v1=")[2]
    ttl = await redis.ttl(keys.webhook_signature(digest))
    assert 0 < ttl <= 601
    # A new signature (new timestamp) for the same body is a new request.
    fresh = await _post(
        client, fid, body, **{"X-Conveyor-Signature": sign(body, int(time.time()) + 1)}
    )
    assert fresh.status == 202


async def test_replay_to_another_flow_with_the_same_secret(make_client: Any) -> None:
    """A signed request captured for one flow is refused by another flow sharing the secret."""
    client: Client = await make_client(AP_CONTAINER_TYPE="APP")
    first = await _signed_flow(client)
    resp = await client.post("/api/v1/flows", json={**SIGNED, "name": "signed-too"})
    assert resp.status == 201, await resp.text()
    second = str((await resp.json())["id"])
    body = b'{"order": 9}'
    header = sign(body)
    assert (await _post(client, first, body, **{"X-Conveyor-Signature": header})).status == 202
    replay = await _post(client, second, body, **{"X-Conveyor-Signature": header})
    assert replay.status == 409
    assert (await replay.json())["error"]["code"] == "SIGNATURE_REPLAYED"


async def test_bad_stale_and_future_signatures_refused(make_client: Any) -> None:
    """Wrong MAC, other body, no header, malformed, >5 min old or ahead: all 401."""
    client: Client = await make_client(AP_CONTAINER_TYPE="APP")
    fid = await _signed_flow(client)
    body = b'{"order": 2}'
    now = int(time.time())
    cases = {
        "missing": None,
        "wrong secret": sign(body, secret="other"),
        "other body": sign(b'{"order": 3}'),
        "malformed": "t=abc,v1=00",
        "unicode digits": "t=\u00b2,v1=00",
        "arabic-indic digits": f"t={''.join(chr(0x660 + int(c)) for c in str(now))},v1=00",
        "no v1": f"t={now}",
        "stale": sign(body, now - 301),
        "future": sign(body, now + 360),
        "huge t": sign(body, 10**15),
    }
    for name, header in cases.items():
        headers = {"X-Conveyor-Signature": header} if header else {}
        resp = await _post(client, fid, body, **headers)
        assert resp.status == 401, name
        assert (await resp.json())["error"]["code"] in ("SIGNATURE_INVALID", "SIGNATURE_EXPIRED")
    ok = await _post(client, fid, body, **{"X-Conveyor-Signature": sign(body, now - 200)})
    assert ok.status == 202


async def test_an_unset_secret_is_not_named_to_the_caller(make_client: Any) -> None:
    """A signed flow whose secret was never set refuses every call with 401, and the answer
    does not name the secret (the operator finds it in the log)."""
    client: Client = await make_client(AP_CONTAINER_TYPE="APP")
    doc = {
        **SIGNED,
        "name": "unset",
        "trigger": {"type": "webhook", "secret": "{{secrets.NEVER_SET_X}}"},
    }
    resp = await client.post("/api/v1/flows", json=doc)
    assert resp.status == 201, await resp.text()
    fid = str((await resp.json())["id"])
    body = b"{}"
    answer = await _post(client, fid, body, **{"X-Conveyor-Signature": sign(body)})
    assert answer.status == 401
    text = await answer.text()
    assert "NEVER_SET_X" not in text and "not set" in text, text


async def test_rotation_several_v1_values(make_client: Any) -> None:
    """A sender rotating secrets may send several v1 values; one valid is enough."""
    client: Client = await make_client(AP_CONTAINER_TYPE="APP")
    fid = await _signed_flow(client)
    body = b"{}"
    good = sign(body)
    t, _, mac = good.partition(",v1=")
    header = f"{t},v1={'0' * 64},v1={mac}"
    assert (await _post(client, fid, body, **{"X-Conveyor-Signature": header})).status == 202


async def test_retry_with_same_idempotency_key_is_not_a_replay(make_client: Any) -> None:
    """The same signed request with its Idempotency-Key gets the first answer; another key 409."""
    client: Client = await make_client(AP_CONTAINER_TYPE="APP")
    fid = await _signed_flow(client)
    body = b'{"order": 4}'
    headers = {"X-Conveyor-Signature": sign(body), "Idempotency-Key": "order-4"}
    first = await _post(client, fid, body, **headers)
    assert first.status == 202
    retry = await _post(client, fid, body, **headers)
    assert retry.status == 202
    assert (await retry.json())["run_id"] == (await first.json())["run_id"]
    forged = await _post(client, fid, body, **{**headers, "Idempotency-Key": "order-4b"})
    assert forged.status == 409


async def test_legacy_signature_only_when_enabled(make_client: Any) -> None:
    """sha256=<hex> is refused by default and accepted with AP_WEBHOOK_LEGACY_SIGNATURES."""
    body = b'{"legacy": true}'
    legacy = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    strict: Client = await make_client(AP_CONTAINER_TYPE="APP")
    fid = await _signed_flow(strict)
    resp = await _post(strict, fid, body, **{"X-Conveyor-Signature": legacy})
    assert resp.status == 401
    assert "AP_WEBHOOK_LEGACY_SIGNATURES" in (await resp.json())["error"]["message"]
    lenient: Client = await make_client(
        AP_CONTAINER_TYPE="APP", AP_WEBHOOK_LEGACY_SIGNATURES="true"
    )
    assert (await _post(lenient, fid, body, **{"X-Conveyor-Signature": legacy})).status == 202
    wrong = "sha256=" + "0" * 64
    assert (await _post(lenient, fid, body, **{"X-Conveyor-Signature": wrong})).status == 401


README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_block(lang: str) -> str:
    """The README's sender example in ``lang`` (from its Webhook signatures paragraph)."""
    text = README.read_text()
    section = text[text.index("**Webhook signatures.**") :]
    return section.split(f"```{lang}\n", 1)[1].split("```", 1)[0]


async def test_readme_sender_examples_work(make_client: Any, tmp_path: Path) -> None:
    """The README's Python and curl examples produce signatures the server accepts, and the
    shell example never puts the secret on a command line."""
    for tool in ("curl", "python3"):
        if shutil.which(tool) is None:
            if os.environ.get("CONVEYOR_CI"):
                pytest.fail(f"{tool} is required in CI")
            pytest.skip(f"{tool} is not installed")
    client: Client = await make_client(AP_CONTAINER_TYPE="APP")
    fid = await _signed_flow(client)
    url = str(client.make_url(f"/api/v1/webhooks/{fid}"))
    scope = {"SECRET": SECRET, "URL": url}
    await asyncio.to_thread(exec, _readme_block("python"), scope)
    # Both examples send the same body: signed within the same second, the second would be
    # a replay (markers are not scoped to a flow). Let the clock move on first.
    await asyncio.sleep(1.02 - time.time() % 1.0)
    path, log = spy_path(tmp_path)
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", _readme_block("sh"),
        env={**os.environ, "SECRET": SECRET, "URL": url, "PATH": path},
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    argv = log.read_text()
    assert "curl " in argv and "X-Conveyor-Signature" in argv, argv
    assert SECRET not in argv, argv
    answer = orjson.loads(out)
    assert answer["status"] == "QUEUED", answer
