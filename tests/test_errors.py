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
from conveyor.api.errors import ApiError, http_error
from conveyor.api.timing import api_middleware
from conveyor.board import error_pages as board_error_pages
from conveyor.embedded import EmbeddedError
from conveyor.engine.errors import FlowInvalid, StepFailed
from conveyor.engine.templating import TemplateSyntaxError
from conveyor.operations import RunFinished, RunNotFinished, UnknownJob, UnknownQueue
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
    """``{"module.Name": class}`` of every exception class defined in a conveyor module."""
    found: dict[str, type[BaseException]] = {}
    for mod in _modules():
        for name, obj in vars(mod).items():
            qualified = f"{mod.__name__}.{name}"
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == mod.__name__
                and qualified not in _CONTROL_FLOW
            ):
                found[qualified] = obj
    return found


def _qualified(cls: type[BaseException]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _drawing(doc: str, home: str) -> list[tuple[str, str | None, str]]:
    """(class, drawn parent, line) as ``module.Name`` for each node of the ``::`` block's tree;
    a node without ``[module]`` lives in ``home``."""
    block = doc.split("::\n", 1)[1]
    nodes: list[tuple[str, str | None, str]] = []
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
        mod = _MODULE.search(line)
        qualified = f"conveyor.{mod['module']}.{m['name']}" if mod else f"{home}.{m['name']}"
        nodes.append((qualified, stack[-1] if stack else None, line))
        stack.append(qualified)
    return nodes


def _tree() -> list[tuple[str, str | None, str]]:
    return _drawing(errors.__doc__ or "", "conveyor.errors")


def test_drawing_is_the_real_hierarchy() -> None:
    """Each class in errors.py's tree exists where drawn, with the drawn parent as first base."""
    classes = _exception_classes()
    drawn = _tree()
    assert drawn[0][:2] == ("conveyor.errors.ConveyorError", None)
    assert len(drawn) == len({q for q, _p, _l in drawn}), "a class is drawn twice"
    for qualified, parent, _line in drawn:
        assert qualified in classes, f"{qualified} is drawn but no such exception exists"
        if parent is not None:
            assert _qualified(classes[qualified].__bases__[0]) == parent, f"{qualified}"


def test_drawing_shows_second_bases() -> None:
    """A class with a second base says so on its line (``+ X``), and only then."""
    classes = _exception_classes()
    for qualified, _parent, line in _tree():
        more = re.search(r"\(\+ ([\w, ]+)\)", line)
        drawn_extra = more[1].split(", ") if more else []
        assert drawn_extra == [b.__name__ for b in classes[qualified].__bases__[1:]], line


def test_every_public_exception_is_on_the_tree() -> None:
    """Every exception class but private control flow derives from ConveyorError and is drawn."""
    classes = _exception_classes()
    drawn = {q for q, _p, _l in _tree()}
    public = {q for q in classes if not q.rsplit(".", 1)[1].startswith("_")}
    outside = sorted(q for q in public if not issubclass(classes[q], errors.ConveyorError))
    assert outside == []
    assert sorted(public - drawn) == []


@pytest.mark.parametrize("module", ["conveyor.engine.errors", "conveyor.queue.errors"])
def test_local_drawings_agree(module: str) -> None:
    """The partial trees in engine/errors.py and queue/errors.py draw real parent links."""
    classes = _exception_classes()
    by_name = {q.rsplit(".", 1)[1]: q for q in classes if q.startswith("conveyor.errors.")}
    drawn = _drawing(importlib.import_module(module).__doc__ or "", module)
    assert len(drawn) >= 4
    for qualified, parent, _line in drawn:
        # Roots and parents drawn without a module may be the project-wide classes.
        cls = classes.get(qualified) or classes[by_name[qualified.rsplit(".", 1)[1]]]
        if parent is not None:
            parent_name = parent.rsplit(".", 1)[1]
            assert cls.__bases__[0].__name__ == parent_name, f"{qualified} under {parent}"


def test_old_except_sites_still_catch() -> None:
    """Moved classes keep the builtin bases callers catch (ValueError, KeyError, RuntimeError)."""
    assert issubclass(TemplateSyntaxError, ValueError)
    assert issubclass(UndecodablePayload, ValueError)
    assert issubclass(JobNotFound, KeyError)
    assert issubclass(EmbeddedError, RuntimeError)
    assert str(EmbeddedError("embedded Redis exited")) == "embedded Redis exited"
    invalid = FlowInvalid([{"path": "steps[0]", "message": "bad"}, {"path": "x", "message": "y"}])
    assert invalid.message == "steps[0]: bad (and 1 more)" and len(invalid.details) == 2


async def _answer(
    exc: BaseException, middleware: Any = None, path: str = "/"
) -> tuple[int, dict[str, Any], Any]:
    async def handler(request: web.Request) -> web.StreamResponse:
        raise exc

    # The API's own middleware (no key) unless another is given.
    app = web.Application(middlewares=[middleware or api_middleware(None)])
    app.router.add_get(path, handler)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        resp = await client.get(path)
        return resp.status, dict(resp.headers), orjson.loads(await resp.read())


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (errors.NotFound("flow 'x' not found"), 404, "NOT_FOUND"),
        (JobNotFound("runs", "j1"), 404, "NOT_FOUND"),
        (errors.Conflict("flow 'x' exists"), 409, "CONFLICT"),
        (errors.ConfigError("bad"), 400, "CONFIG_ERROR"),
        (errors.InvalidArgument("strategy must be one of A, B"), 400, "BAD_REQUEST"),
        (UnknownQueue("no queue 'q'"), 404, "QUEUE_NOT_FOUND"),
        (UnknownJob("no job 'j' in 'runs'"), 404, "JOB_NOT_FOUND"),
        (RunFinished("run already ended as SUCCEEDED"), 409, "RUN_FINISHED"),
        (RunNotFinished("run is RUNNING; only finished runs retry"), 409, "RUN_NOT_FINISHED"),
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


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (errors.NotFound("no such run"), 404, "NOT_FOUND"),
        (ConnectionRefusedError("127.0.0.1:5432"), 503, "UNAVAILABLE"),
        (web.HTTPMethodNotAllowed("PUT", ["GET"]), 405, "METHOD_NOT_ALLOWED"),
        (KeyError("oops"), 500, "INTERNAL_ERROR"),
    ],
)
async def test_http_error_is_the_middlewares_mapping(
    exc: Exception, status: int, code: str
) -> None:
    """The function the board calls answers exactly what the API's middleware sends."""
    mapped = http_error(exc)
    got_status, headers, body = await _answer(exc)
    assert (mapped.status, mapped.code) == (got_status, body["error"]["code"]) == (status, code)
    assert mapped.message == body["error"]["message"]
    for name in ("Retry-After", "Allow"):
        assert mapped.headers.get(name) == headers.get(name)


@pytest.mark.parametrize(
    "exc",
    [
        errors.NotFound("no such run"),
        UnknownJob("no failed job 'j' in 'runs'"),
        QueueUnavailable("Connection refused 127.0.0.1:6379"),
        ConnectionRefusedError("127.0.0.1:5432"),
        web.HTTPRequestEntityTooLarge(max_size=10, actual_size=20),
        web.HTTPMethodNotAllowed("PUT", ["GET"]),
        KeyError("oops"),
    ],
)
async def test_the_board_answers_what_the_api_answers(exc: Exception) -> None:
    """The board's error pages (JSON under /admin/api/) use the same mapping as the API:
    same status, code, message and Retry-After/Allow for the same exception."""
    api_status, api_headers, api_body = await _answer(exc)
    board_status, board_headers, board_body = await _answer(
        exc, board_error_pages, "/admin/api/probe"
    )
    assert (board_status, board_body) == (api_status, api_body)
    for name in ("Retry-After", "Allow"):
        assert board_headers.get(name) == api_headers.get(name)
