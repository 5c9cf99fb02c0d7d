"""The ``conveyor`` command: ``up``, ``migrate``, ``config``, ``flows``, ``runs``, ``secrets``.

Settings are parsed once here; a bad value prints one line naming the variable, the value and
what is allowed, and exits with code 2 — never a traceback. ``flows``, ``runs`` and
``secrets`` talk to a running Conveyor over its HTTP API (``--url``, default from
``AP_HOST``/``AP_PORT``), so they work the same against a laptop and a cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

import orjson
import yaml

from conveyor import __version__
from conveyor.client import ApiClient, ApiClientError
from conveyor.settings import Settings, SettingsError


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        print(f"conveyor: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_up(args: argparse.Namespace) -> int:
    settings = _settings()
    if settings.pm2_enabled:
        # Imported before anything loads prometheus-client: the supervisor must set up the
        # multiprocess metrics directory first.
        from conveyor import supervisor  # noqa: PLC0415

        return supervisor.run(settings)
    from conveyor.runtime import run  # noqa: PLC0415 - keep `conveyor config` light

    return run(settings)


def cmd_migrate(args: argparse.Namespace) -> int:
    import asyncpg  # noqa: PLC0415

    from conveyor.embedded import EmbeddedServers  # noqa: PLC0415
    from conveyor.store.migrations import migrate  # noqa: PLC0415

    embedded = EmbeddedServers(_settings())
    settings = embedded.start(with_redis=False)

    async def _migrate() -> int:
        conn = await asyncpg.connect(settings.postgres_url)
        try:
            applied = await migrate(conn)
        finally:
            await conn.close()
        for mig in applied:
            print(f"applied {mig.version:04d}_{mig.name}")
        if not applied:
            print("nothing to apply")
        return 0

    try:
        return asyncio.run(_migrate())
    except OSError as exc:
        print(f"conveyor: cannot reach PostgreSQL: {exc}", file=sys.stderr)
        return 1
    finally:
        embedded.stop()


def cmd_config(args: argparse.Namespace) -> int:
    for name, value in _settings().effective().items():
        print(f"{name}={value}")
    return 0


def _client(args: argparse.Namespace) -> ApiClient:
    return ApiClient.from_settings(_settings(), args.url)


def cmd_flows_apply(args: argparse.Namespace) -> int:
    """Create the flow of FILE, or save it as a new version of the flow with its name."""
    path = Path(args.file)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        print(f"conveyor: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return 2
    is_yaml = path.suffix.lower() in (".yaml", ".yml")
    ctype = "application/yaml" if is_yaml else "application/json"
    try:
        doc = yaml.safe_load(raw) if is_yaml else orjson.loads(raw)
    except (yaml.YAMLError, orjson.JSONDecodeError) as exc:
        print(
            f"conveyor: {path} is not valid {'YAML' if is_yaml else 'JSON'}: {exc}", file=sys.stderr
        )
        return 2
    name = doc.get("name") if isinstance(doc, dict) else None
    client = _client(args)
    existing = client.request("GET", f"/api/v1/flows?name={quote(str(name or ''))}")["data"]
    if existing:
        flow = client.request(
            "PUT", f"/api/v1/flows/{existing[0]['id']}", data=raw, content_type=ctype
        )
        action = "updated"
    else:
        flow = client.request("POST", "/api/v1/flows", data=raw, content_type=ctype)
        action = "created"
    print(f"{action} flow {flow['name']!r} id={flow['id']} version={flow['version']}")
    print(f"  webhook:      {flow['webhook_url']}")
    print(f"  sync webhook: {flow['sync_webhook_url']}")
    return 0


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def cmd_flows_list(args: argparse.Namespace) -> int:
    data = _client(args).request("GET", "/api/v1/flows?limit=200")["data"]
    rows = [
        [
            f["id"],
            f["name"],
            str(f["version"]),
            "yes" if f["enabled"] else "no",
            f["trigger"]["type"],
        ]
        for f in data
    ]
    print(_table(rows, ["ID", "NAME", "VERSION", "ENABLED", "TRIGGER"]))
    return 0


def cmd_runs_list(args: argparse.Namespace) -> int:
    query = [f"limit={args.limit}"]
    if args.flow:
        query.append(f"flow_id={quote(args.flow)}")
    if args.status:
        query.append(f"status={quote(args.status)}")
    data = _client(args).request("GET", "/api/v1/flow-runs?" + "&".join(query))["data"]
    rows = [
        [
            r["id"],
            r["flow_id"],
            str(r["flow_version"]),
            r["status"],
            r["created_at"] or "",
            "" if r["duration_ms"] is None else f"{r['duration_ms']:.1f}",
        ]
        for r in data
    ]
    print(_table(rows, ["ID", "FLOW", "VERSION", "STATUS", "CREATED", "MS"]))
    return 0


def _short(value: object, width: int = 60) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def cmd_runs_show(args: argparse.Namespace) -> int:
    run = _client(args).request("GET", f"/api/v1/flow-runs/{quote(args.id)}")
    print(
        f"run {run['id']}  flow {run['flow_id']} v{run['flow_version']}  {run['status']}"
        f"  attempt {run['attempt']}  {run['duration_ms'] or 0:.1f} ms"
    )
    if run["error"]:
        print(f"error: {_short(run['error'], 200)}")
    rows = [
        [
            ("  " if s["parent"] else "") + s["name"],
            s["type"],
            s["status"],
            f"{s['duration_ms'] or 0:.1f}",
            _short(s["output"] if s["error"] is None else s["error"]),
        ]
        for s in run["steps"]
    ]
    print(_table(rows, ["STEP", "TYPE", "STATUS", "MS", "OUTPUT / ERROR"]))
    return 0


def cmd_secrets_set(args: argparse.Namespace) -> int:
    """The value is read from standard input, never from the command line (shell history)."""
    value = sys.stdin.read()
    if value.endswith("\n"):
        value = value[:-1]
    _client(args).request("PUT", f"/api/v1/secrets/{quote(args.name)}", json={"value": value})
    print(f"secret {args.name} set")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conveyor", description="Workflow automation on Redis Streams and PostgreSQL."
    )
    parser.add_argument("--version", action="version", version=f"conveyor {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="run Conveyor in the role of AP_CONTAINER_TYPE").set_defaults(
        func=cmd_up
    )
    sub.add_parser("migrate", help="apply pending database migrations").set_defaults(
        func=cmd_migrate
    )
    sub.add_parser("config", help="print the effective settings, secrets masked").set_defaults(
        func=cmd_config
    )
    api = argparse.ArgumentParser(add_help=False)
    api.add_argument("--url", help="API base URL (default http://AP_HOST:AP_PORT)")

    flows = sub.add_parser("flows", help="manage flows").add_subparsers(dest="sub", required=True)
    apply = flows.add_parser("apply", parents=[api], help="create a flow or save a new version")
    apply.add_argument("file", help="flow document (.json, .yaml or .yml)")
    apply.set_defaults(func=cmd_flows_apply)
    flows.add_parser("list", parents=[api], help="list flows").set_defaults(func=cmd_flows_list)

    runs = sub.add_parser("runs", help="inspect runs").add_subparsers(dest="sub", required=True)
    rlist = runs.add_parser("list", parents=[api], help="list runs, newest first")
    rlist.add_argument("--flow", help="flow id")
    rlist.add_argument("--status", help="run status, e.g. FAILED")
    rlist.add_argument("--limit", type=int, default=50)
    rlist.set_defaults(func=cmd_runs_list)
    show = runs.add_parser("show", parents=[api], help="a run and its step log")
    show.add_argument("id")
    show.set_defaults(func=cmd_runs_show)

    secrets = sub.add_parser("secrets", help="manage secrets").add_subparsers(
        dest="sub", required=True
    )
    sset = secrets.add_parser("set", parents=[api], help="set NAME to the value read from stdin")
    sset.add_argument("name")
    sset.set_defaults(func=cmd_secrets_set)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ApiClientError as exc:
        print(f"conveyor: {exc}", file=sys.stderr)
        for detail in exc.details or []:
            print(f"  {detail.get('path')}: {detail.get('message')}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
