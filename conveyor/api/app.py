"""The API's route table: ``add_api_routes(app)`` mounts the ``/api/v1`` handlers.

The handlers are thin adapters over the services :mod:`conveyor.app` (the composition root)
builds; that module also mounts the admin routes, the board and the probes.
"""

from __future__ import annotations

from aiohttp import web

from conveyor.api import docs, flows, openapi, runs, secrets, webhooks


def add_api_routes(app: web.Application) -> None:
    r = app.router
    for path in ("/api/v1/webhooks/{flow_id}", "/api/v1/webhooks/{flow_id}/"):
        r.add_route("*", path, webhooks.webhook_async)
    r.add_route("*", "/api/v1/webhooks/{flow_id}/sync", webhooks.webhook_sync)
    r.add_post("/api/v1/flows", flows.create_flow)
    r.add_get("/api/v1/flows", flows.list_flows)
    r.add_get("/api/v1/flows/{id}", flows.get_flow)
    r.add_put("/api/v1/flows/{id}", flows.update_flow)
    r.add_delete("/api/v1/flows/{id}", flows.delete_flow)
    r.add_post("/api/v1/flows/{id}/enable", flows.enable_flow)
    r.add_post("/api/v1/flows/{id}/disable", flows.disable_flow)
    r.add_post("/api/v1/flows/{id}/run", flows.run_flow)
    r.add_get("/api/v1/secrets", secrets.list_secrets)
    r.add_put("/api/v1/secrets/{name}", secrets.put_secret)
    r.add_delete("/api/v1/secrets/{name}", secrets.delete_secret)
    r.add_get("/api/v1/flow-runs", runs.list_runs)
    r.add_get("/api/v1/flow-runs/{id}", runs.get_run)
    r.add_post("/api/v1/flow-runs/{id}/retry", runs.retry_run)
    r.add_post("/api/v1/flow-runs/{id}/cancel", runs.cancel_run)
    r.add_get("/api/v1/openapi.json", openapi.openapi)
    docs.add_docs_routes(r)
