"""The storage-independent core of Conveyor: flow model, templating, pieces and executor.

Nothing here touches Redis or Postgres; the worker injects a checkpoint sink, a sandbox and
an HTTP session, so the engine is tested on its own and wired by the worker.
"""

from __future__ import annotations
