"""The built-in step types, one module each, registered here in the order users see them.

Each module defines a :class:`~conveyor.engine.spec.StepSpec` named ``SPEC``: leaf types
(transform, code, http, respond) give a *piece* — ``async def piece(env, step, input) ->
(output, logs)`` raising :class:`~conveyor.engine.errors.StepFailed` for failures the user
should see — and control-flow types (branch, loop, delay) a walk function, because they
steer the walk itself. Adding a type is one module plus one line below
(docs/architecture.md, "Adding a step type").
"""

from __future__ import annotations

from conveyor.engine.pieces import branch, code, delay, http, loop, respond, transform
from conveyor.engine.spec import REGISTRY, Piece

for _module in (transform, code, http, branch, loop, delay, respond):
    REGISTRY.register(_module.SPEC)

__all__ = ["REGISTRY", "Piece"]
