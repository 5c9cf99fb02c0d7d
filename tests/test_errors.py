"""The error tree: drawn as it is, every public exception on it, mapped to HTTP in one place."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

import conveyor
from conveyor import errors
from conveyor.api.errors import ApiError, error_middleware
from conveyor.embedded import EmbeddedError
from conveyor.engine.errors import FlowInvalid, StepFailed
from conveyor.engine.templating import TemplateSyntaxError
from conveyor.queue.errors import JobNotFound, QueueFull, QueueUnavailable
from conveyor.queue.job import UndecodablePayload

#: Control-flow exceptions that are not errors (never escape their module's caller).
_CONTROL_FLOW = {"conveyor.engine.spec.Stop"}
_NODE = re.compile(r"^(?P<prefix>(?:[│ ]   )*)(?P<branch>[├└]── )?(?P<name>[A-Za-z_]\w*)")
_MODULE = re.compile(r"\[(?P<module>[\w.]+)\]\s*$")


def _modules() -> list[Any]:
    mods = [conveyor]
    for info in pkgutil.walk_packages(conveyor.__path__, "conveyor."):
        if not info.name.endswith("__main__"):
            mods.append(importlib.import_module(info.name))
    return mods


def _exception_classes() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for mod in _modules():
        for name, obj in vars(mod).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == mod.__name__
                and f"{mod.__name__}.{name}" not in _CONTROL_FLOW
            ):
                assert name not in found or found[name] is obj, f"two exceptions named {name}"
                found[name] = obj
    return found


def _drawing(doc: str) -> list[tuple[str, str | None, str | None]]:
    """(name, drawn parent, module in brackets) for each node of the ``::`` block's tree."""
    block = doc.split("::\n", 1)[1]
    nodes: list[tuple[str, str | None, str | None]] = []
    stack: list[str] = []
    for raw in block.splitlines():
        if not raw.strip():
            if nodes:
                break
            continue
        if not raw.startswith("    "):
            break
        line = raw[4:]
        if line.startswith(" ") and "── " not in line:
            continue  # a description continued on the next line
        m = _NODE.match(line)
        assert m, f"cannot read tree line {raw!r}"
        depth = len(m["prefix"]) // 4 + (1 if m["branch"] else 0)
        del stack[depth:]
        parent = stack[-1] if stack else None
        mod = _MODULE.search(line)
        nodes.append((m["name"], parent, mod["module"] if mod else None))
        stack.append(m["name"])
    return nodes


def test_drawing_is_the_real_hierarchy() -> None:
    """Each class in errors.py's tree has the drawn parent as first base and lives where drawn."""
    classes = _exception_classes()
    drawn = _drawing(errors.__doc__ or "")
    assert drawn[0] == ("ConveyorError", None, None)
    for name, parent, module in drawn:
        assert name in classes, f"{name} is drawn but no such exception exists"
        cls = classes[name]
        if parent is not None:
            assert cls.__bases__[0].__name__ == parent, f"{name} is drawn under {parent}"
        assert cls.__module__ == f"conveyor.{module or 'errors'}", f"{name} is in {cls.__module__}"


def test_drawing_shows_second_bases() -> None:
    """A class with a second base says so in the drawing (``+ X``)."""
    doc = errors.__doc__ or ""
    classes = _exception_classes()
    for name, _parent, _module in _drawing(doc):
        line = next(ln for ln in doc.splitlines() if re.search(rf"── {name}\b|^    {name}\b", ln))
        more = re.search(r"\(\+ ([\w, ]+)\)", line)
        drawn_extra = more[1].split(", ") if more else []
        assert drawn_extra == [b.__name__ for b in classes[name].__bases__[1:]], line


def test_every_public_exception_is_on_the_tree() -> None:
    """Every exception class but private control flow derives from ConveyorError and is drawn."""
    classes = _exception_classes()
    drawn = {name for name, _p, _m in _drawing(errors.__doc__ or "")}
    public = {n for n in classes if not n.startswith("_")}
    outside = sorted(n for n in public if not issubclass(classes[n], errors.ConveyorError))
    assert outside == []
    assert sorted(public - drawn) == []


@pytest.mark.parametrize("module", ["conveyor.engine.errors", "conveyor.queue.errors"])
def test_local_drawings_agree(module: str) -> None:
    """The partial trees in engine/errors.py and queue/errors.py draw real parent links."""
    classes = _exception_classes()
    doc = importlib.import_module(module).__doc__ or ""
    drawn = _drawing(doc)
    assert len(drawn) >= 4
    for name, parent, _module in drawn:
        if parent is not None:
            assert classes[name].__bases__[0].__name__ == parent, f"{name} under {parent}"


def test_old_except_sites_still_catch() -> None:
    """Moved classes keep the builtin bases callers catch (ValueError, KeyError, RuntimeError)."""
    assert issubclass(TemplateSyntaxError, ValueError)
    assert issubclass(UndecodablePayload, ValueError)
    assert issubclass(JobNotFound, KeyError)
    assert issubclass(EmbeddedError, RuntimeError)
    assert str(EmbeddedError("embedded Redis exited")) == "embedded Redis exited"
    invalid = FlowInvalid([{"path": "steps[0]", "message": "bad"}, {"path": "x", "message": "y"}])
    assert invalid.message == "steps[0]: bad (and 1 more)" and len(invalid.details) == 2


async def _answer(exc: BaseException) -> tuple[int, dict[str, Any], Any]:
    async def handler(request: web.Request) -> web.StreamResponse:
        raise exc

    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/", handler)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        resp = await client.get("/")
        return resp.status, dict(resp.headers), orjson.loads(await resp.read())


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (errors.NotFound("flow 'x' not found"), 404, "NOT_FOUND"),
        (JobNotFound("runs", "j1"), 404, "NOT_FOUND"),
        (errors.Conflict("flow 'x' exists"), 409, "CONFLICT"),
        (errors.ConfigError("bad"), 400, "CONFIG_ERROR"),
        (FlowInvalid([{"path": "steps", "message": "empty"}]), 422, "FLOW_INVALID"),
        (TemplateSyntaxError("unclosed template"), 422, "FLOW_INVALID"),
        (QueueFull("runs", 10), 429, "QUEUE_FULL"),
        (QueueUnavailable("Connection refused 127.0.0.1:6379"), 503, "UNAVAILABLE"),
        (errors.BackendUnavailable("PostgreSQL", "10.0.0.1:5432 refused"), 503, "UNAVAILABLE"),
        (StepFailed("boom"), 500, "INTERNAL_ERROR"),
        (errors.InternalError("bug"), 500, "INTERNAL_ERROR"),
        (ApiError(415, "UNSUPPORTED_MEDIA_TYPE", "send JSON"), 415, "UNSUPPORTED_MEDIA_TYPE"),
    ],
)
async def test_middleware_maps_the_tree(exc: errors.ConveyorError, status: int, code: str) -> None:
    """Domain errors raised by services get their branch's status and their class's code."""
    got_status, headers, body = await _answer(exc)
    assert (got_status, body["error"]["code"]) == (status, code), body
    message = body["error"]["message"]
    if status == 500:
        assert message == "internal server error"
    elif status == 503:
        assert message.endswith("unavailable, retry later") and "127.0.0.1" not in message
        assert "10.0.0.1" not in message
    else:
        assert message == exc.message
    if status in (429, 503):
        assert headers["Retry-After"] in ("1", "5")
    if status == 422:
        assert body["error"]["details"][0]["message"] in ("empty", "unclosed template")
