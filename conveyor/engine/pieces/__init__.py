"""Pieces: the leaf step types (transform, http, code, respond) behind one signature.

A piece is ``async def piece(env, step, input) -> (output, logs)``; it raises
:class:`~conveyor.engine.errors.StepFailed` for failures the user should see. Control-flow
types (branch, loop, delay) live in the executor because they steer the walk itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final

from conveyor.engine.context import RunEnv
from conveyor.engine.flow import Step
from conveyor.engine.pieces.basic import respond, transform
from conveyor.engine.pieces.code import code
from conveyor.engine.pieces.http import http

Piece = Callable[[RunEnv, Step, Any], Awaitable[tuple[Any, str]]]

PIECES: Final[dict[str, Piece]] = {
    "transform": transform,
    "respond": respond,
    "code": code,
    "http": http,
}

__all__ = ["PIECES", "Piece"]
