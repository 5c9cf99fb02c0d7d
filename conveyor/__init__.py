"""Conveyor: a workflow-automation engine on Redis Streams, PostgreSQL and sandboxed workers."""

from __future__ import annotations

__version__ = "0.1.0"
