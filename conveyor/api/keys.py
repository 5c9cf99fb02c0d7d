"""The app keys request handlers read, re-exported from :mod:`conveyor.keys`."""

from __future__ import annotations

from conveyor.keys import (
    DB,
    PRODUCER,
    REDIS,
    REGISTRY,
    REPLIES,
    RUN_WRITER,
    SANDBOX_REPORT,
    SECRET_BOX,
    SETTINGS,
    STATE,
    SUBMITTER,
    WORKER,
    ProcessState,
)

__all__ = [
    "DB",
    "PRODUCER",
    "REDIS",
    "REGISTRY",
    "REPLIES",
    "RUN_WRITER",
    "SANDBOX_REPORT",
    "SECRET_BOX",
    "SETTINGS",
    "STATE",
    "SUBMITTER",
    "WORKER",
    "ProcessState",
]
