"""SSRF protection: the address policy, and hostile resolutions refused inside a namespace.

The connecting cases run in a child process inside ``unshare -n`` (a network namespace with
only loopback), so no packet can leave the machine even if protection regressed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from conveyor.engine.errors import SsrfRefused
from conveyor.engine.ssrf import SsrfPolicy, forbidden_reason

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.8.9.10",
        "10.0.0.5",
        "172.16.3.4",
        "192.168.1.1",
        "169.254.169.254",
        "0.0.0.0",
        "100.64.0.1",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "fd00:ec2::254",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "2002:a00:5::1",
        "64:ff9b::a00:5",
    ],
)
def test_forbidden_addresses(address: str) -> None:
    """Private, loopback, link-local/metadata, unspecified, multicast, reserved are refused."""
    assert forbidden_reason(ipaddress.ip_address(address)) is not None
    with pytest.raises(SsrfRefused, match="SSRF"):
        SsrfPolicy().check("h", address)


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    """Globally routable unicast addresses are allowed (checked, never connected to)."""
    assert forbidden_reason(ipaddress.ip_address(address)) is None
    SsrfPolicy().check("example.com", address)


def test_allow_list_hosts_ips_and_cidrs() -> None:
    """Allow-list entries may be host names, IPs or CIDRs; disabled protection allows all."""
    policy = SsrfPolicy.from_setting(True, "internal.svc, 10.1.0.0/16,127.0.0.1, [::1]")
    policy.check("internal.svc", "10.9.9.9")
    policy.check("INTERNAL.svc.", "10.9.9.9")
    policy.check("x", "10.1.2.3")
    policy.check("x", "127.0.0.1")
    policy.check("x", "::1")
    with pytest.raises(SsrfRefused):
        policy.check("x", "10.2.0.1")
    with pytest.raises(SsrfRefused):
        policy.check("x", "127.0.0.2")
    SsrfPolicy(enabled=False).check("x", "169.254.169.254")
    assert SsrfPolicy.from_setting(True, None).allow_list == ()


def _namespace_cmd() -> list[str]:
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if unshare is None or ip is None:
        pytest.skip("unshare/ip not available")
    script = f"{ip} link set lo up && exec {sys.executable} -m tests.engine.ssrf_probe"
    return [unshare, "-n", "sh", "-c", script]


@pytest.fixture(scope="module")
def probe() -> dict[str, Any]:
    """Outcomes of the hostile cases, run by ssrf_probe.py inside `unshare -n`."""

    async def go() -> tuple[int, bytes, bytes]:
        proc = await asyncio.create_subprocess_exec(
            *_namespace_cmd(),
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 90)
        assert proc.returncode is not None
        return proc.returncode, out, err

    rc, out, err = asyncio.run(go())
    if rc != 0 and b"Operation not permitted" in err:
        pytest.skip("unshare -n needs root / CAP_SYS_ADMIN")
    assert rc == 0, err.decode()[-2000:]
    result: dict[str, Any] = orjson.loads(out)
    return result


@pytest.mark.parametrize(
    "case",
    [
        "name_to_loopback",
        "name_to_private",
        "name_to_metadata",
        "name_to_ipv6_loopback",
        "name_with_one_private_address",
        "name_to_mapped_private",
        "name_to_cgnat",
        "literal_metadata",
        "literal_private",
        "literal_ipv6_loopback",
        "literal_mapped_loopback",
        "literal_unspecified",
        "redirect_to_private_name",
        "redirect_to_metadata",
    ],
)
def test_hostile_target_refused(probe: dict[str, Any], case: str) -> None:
    """Each hostile resolution, literal or redirect hop is refused by SSRF protection."""
    res = probe[case]
    assert res["status"] == "FAILED"
    assert "SSRF protection" in res["error"]["message"], res


@pytest.mark.parametrize("case", ["connector_literal_private", "connector_redirect_to_private"])
def test_connector_refuses_on_its_own(probe: dict[str, Any], case: str) -> None:
    """The guarded connector refuses by itself, also on redirects aiohttp follows."""
    res = probe[case]
    assert res["status"] == "RAISED"
    assert res["error"].startswith("SsrfRefused"), res


def test_allowed_loopback_reached_in_namespace(probe: dict[str, Any]) -> None:
    """The allow-listed loopback server answers, so refusals above are not network failures."""
    assert probe["allowed_loopback"]["status"] == "SUCCEEDED"


def test_namespace_blocks_even_without_protection(probe: dict[str, Any]) -> None:
    """With protection off the request still cannot leave: it fails at the network layer."""
    res = probe["control_protection_off"]
    assert res["status"] == "FAILED"
    assert "SSRF" not in res["error"]["message"]
