"""Sandboxed execution of ``code`` steps: isolated, limited, warm.

The engine calls :meth:`Sandbox.run_code`; the flow validator calls :func:`validate_code`;
``/readyz`` shows :attr:`Sandbox.isolation`. The pieces, one module per concept:
:mod:`~conveyor.sandbox.protocol` (frames), :mod:`~conveyor.sandbox.channel` (frames on the
worker's event loop), :mod:`~conveyor.sandbox.isolation` (launchers, report, policy),
:mod:`~conveyor.sandbox.forkserver` (the process inside the isolation that forks),
:mod:`~conveyor.sandbox.child` (lock-down and the execution loop),
:mod:`~conveyor.sandbox.limits` (rlimits, uid, namespaces),
:mod:`~conveyor.sandbox.cgroups` (a cgroup per child: memory and pids of the whole tree),
:mod:`~conveyor.sandbox.config` (``SandboxConfig``, from ``Settings``),
:mod:`~conveyor.sandbox.outcome` (statuses, results) and
:mod:`~conveyor.sandbox.client` (the worker-side pool). Names are imported lazily so the
fork-server, which imports this package too, loads nothing it does not use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conveyor.sandbox.client import Sandbox
    from conveyor.sandbox.config import SandboxConfig
    from conveyor.sandbox.isolation import Isolation, SandboxUnavailable
    from conveyor.sandbox.limits import Limits
    from conveyor.sandbox.outcome import SandboxResult, SandboxStatus
    from conveyor.sandbox.validate import validate_code

__all__ = [
    "Isolation",
    "Limits",
    "Sandbox",
    "SandboxConfig",
    "SandboxResult",
    "SandboxStatus",
    "SandboxUnavailable",
    "validate_code",
]

_WHERE = {
    "Sandbox": "client",
    "SandboxConfig": "config",
    "SandboxResult": "outcome",
    "SandboxStatus": "outcome",
    "Isolation": "isolation",
    "SandboxUnavailable": "isolation",
    "Limits": "limits",
    "validate_code": "validate",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'conveyor.sandbox' has no attribute {name!r}")
    return getattr(importlib.import_module(f"conveyor.sandbox.{module}"), name)
