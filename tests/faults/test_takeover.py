"""A worker killed (SIGKILL) or stopped (SIGTERM) mid-run: another worker takes its runs over
within the promised time, with the default timeouts, and nothing runs twice that was
checkpointed. Both tests print the measured takeover."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import pytest

from tests.faults.harness import (
    Deployment,
    Endpoint,
    all_terminal,
    check_invariants,
    create_flow,
    flow,
    post_runs,
)
from tests.polling import eventually

#: The first call of each run's http step is held this long: the run is surely mid-step when
#: its worker goes, and only a redelivery (which is answered at once) lets it finish.
HOLD_S = 120.0


async def _sync_call(port: int, flow_id: str) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{port}/api/v1/webhooks/{flow_id}/sync"
        async with http.post(url, json={"n": 99}) as r:
            return r.status, await r.json()


@pytest.mark.slow
async def test_kill9_worker_runs_resume_within_10s(
    deployment: Deployment, endpoint: Endpoint
) -> None:
    """SIGKILL of a worker holding 4 runs (one a waiting sync call): a live worker resumes
    every one within 10 s with default settings, the sync caller gets its 200."""
    app = await deployment.start("APP")
    victim = await deployment.start("WORKER")
    flow_id = await create_flow(app, flow(endpoint, HOLD_S))
    run_ids = await post_runs(app, flow_id, 3)
    sync = asyncio.ensure_future(_sync_call(app.port, flow_id))
    await eventually(
        lambda: endpoint.first_calls(1) == 4,
        timeout_s=30,
        interval_s=0.1,
        what="victim holds 4 runs",
    )
    await deployment.start("WORKER")
    victim.proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    await victim.proc.wait()
    await eventually(
        lambda: endpoint.first_calls(2) == 4,
        timeout_s=30,
        interval_s=0.1,
        what="every run redelivered",
    )
    takeover = max(times[1] for times in endpoint.calls.values()) - killed
    print(f"\ntakeover after SIGKILL: {takeover:.2f} s")
    assert takeover <= 10.0
    status, body = await asyncio.wait_for(sync, 30)
    assert status == 200 and body == {"n": 99}
    run_ids.append(next(k.split(":")[0] for k in endpoint.calls if k.split(":")[0] not in run_ids))
    await eventually(
        lambda: all_terminal(deployment.postgres_url, run_ids),
        timeout_s=30,
        interval_s=0.1,
        what="runs terminal",
    )
    await check_invariants(deployment.postgres_url, run_ids, endpoint, deployment)


@pytest.mark.slow
async def test_sigterm_past_drain_hands_runs_back_within_2s(
    deployment: Deployment, endpoint: Endpoint
) -> None:
    """SIGTERM of a worker whose runs outlast AP_WORKER_DRAIN_SECONDS: at the deadline they
    are handed back and a live worker resumes them within 2 s; the stopped worker exits 0."""
    drain_s = 1.0
    app = await deployment.start("APP")
    leaving = await deployment.start("WORKER", AP_WORKER_DRAIN_SECONDS=str(int(drain_s)))
    flow_id = await create_flow(app, flow(endpoint, HOLD_S))
    run_ids = await post_runs(app, flow_id, 4)
    await eventually(
        lambda: endpoint.first_calls(1) == 4,
        timeout_s=30,
        interval_s=0.1,
        what="leaving worker holds 4 runs",
    )
    await deployment.start("WORKER")
    leaving.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + drain_s
    await eventually(
        lambda: endpoint.first_calls(2) == 4,
        timeout_s=30,
        interval_s=0.1,
        what="every run redelivered",
    )
    handback = max(times[1] for times in endpoint.calls.values()) - deadline
    print(f"\nresumed after the drain deadline: {handback:.2f} s")
    assert handback <= 2.0
    assert await asyncio.wait_for(leaving.proc.wait(), 30) == 0
    await eventually(
        lambda: all_terminal(deployment.postgres_url, run_ids),
        timeout_s=30,
        interval_s=0.1,
        what="runs terminal",
    )
    await check_invariants(deployment.postgres_url, run_ids, endpoint, deployment)
