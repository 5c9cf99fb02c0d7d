"""The ``conveyor`` command: ``up``, ``migrate``, ``config``, ``flows``, ``runs``, ``secrets``.

Settings are parsed once here; a bad value prints one line naming the variable, the value and
what is allowed, and exits with code 2 — never a traceback. ``flows``, ``runs`` and
``secrets`` talk to a running Conveyor over its HTTP API (``--url``, default from
``AP_HOST``/``AP_PORT``), so they work the same against a laptop and a cluster. Flows are
named by their name (or id); every listing takes ``--json`` for scripts.

Exit codes, the same for every command (the README's CLI table lists them):

- 0: done; for ``flows run --sync`` and ``runs follow``, the run SUCCEEDED.
- 1: the API refused the request, or the followed run ended in another terminal status.
- 2: usage or configuration: bad arguments, a bad ``AP_*`` setting, a flow file that cannot be
  read or is not YAML/JSON, ``--data`` that is not JSON. (A flow the API refuses as invalid,
  422 ``FLOW_INVALID``, is a refused request: 1.)
- 3: not found: no flow with that name or id, no run with that id.
- 4: the API cannot be reached.
- 141: standard output was closed early (``| head``); the command stops quietly, as Unix tools
  killed by SIGPIPE do.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import yaml

from conveyor import __version__, errors
from conveyor.client import ApiClient, ApiClientError
from conveyor.settings import Settings, SettingsError
from conveyor.status import TERMINAL, RunStatus

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_UNREACHABLE = 4
EXIT_BROKEN_PIPE = 141

FOLLOW_JSON_HELP = (
    'With --json: one JSON object per line as things happen, {"status": S} or '
    '{"step": {...}}, the last line the whole run record (GET /api/v1/flow-runs/{id}).'
)

EXIT_CODES_HELP = """\
exit codes (every command): 0 done (for --sync and follow: the run SUCCEEDED); 1 the API
refused the request, or the run ended FAILED, CANCELED, TIMEOUT ...; 2 usage or configuration
(bad arguments, a bad AP_* setting, an unreadable flow file, --data not JSON); 3 no such flow
or run; 4 the API cannot be reached.

flows, runs and secrets call a running Conveyor at --url (default http://AP_HOST:AP_PORT, from
the same AP_* variables as `conveyor up`), sending AP_API_KEY as bearer token when it is set.
"""


class NotFound(errors.NotFound):
    """No flow or run answers to the name or id given (exit code 3)."""


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
        return EXIT_UNREACHABLE
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
        return EXIT_USAGE
    is_yaml = path.suffix.lower() in (".yaml", ".yml")
    ctype = "application/yaml" if is_yaml else "application/json"
    try:
        doc = yaml.safe_load(raw) if is_yaml else orjson.loads(raw)
    except (yaml.YAMLError, orjson.JSONDecodeError) as exc:
        print(
            f"conveyor: {path} is not valid {'YAML' if is_yaml else 'JSON'}: {exc}", file=sys.stderr
        )
        return EXIT_USAGE
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


def _print_json(value: Any) -> None:
    print(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


def _find_flow(client: ApiClient, ref: str) -> dict[str, Any]:
    """The flow named ``ref`` (or with id ``ref``); :class:`NotFound` if there is none."""
    try:
        uuid.UUID(ref)
    except ValueError:
        found = client.request("GET", f"/api/v1/flows?name={quote(ref)}")["data"]
        if not found:
            raise NotFound(f"no flow named {ref!r}") from None
        flow: dict[str, Any] = found[0]
        return flow
    try:
        by_id: dict[str, Any] = client.request("GET", f"/api/v1/flows/{quote(ref)}")
    except ApiClientError as exc:
        if exc.status == 404:
            raise NotFound(f"no flow with id {ref}") from None
        raise
    return by_id


def _run_ref(ref: str) -> str:
    try:
        return str(uuid.UUID(ref))
    except ValueError:
        raise NotFound(f"no run with id {ref!r} (run ids are UUIDs)") from None


def _trigger_text(trigger: dict[str, Any]) -> str:
    """``webhook``, ``webhook (signed)`` or ``schedule '30 7 * * 1-5' Europe/Berlin``."""
    kind = str(trigger.get("type"))
    if kind == "schedule":
        return f"schedule {trigger.get('cron')!r} {trigger.get('timezone') or 'UTC'}"
    if kind == "webhook" and trigger.get("secret"):
        return "webhook (signed)"
    return kind


def cmd_flows_list(args: argparse.Namespace) -> int:
    data = list(_client(args).paged("/api/v1/flows"))
    if args.json:
        _print_json(data)
        return 0
    rows = [
        [
            f["id"],
            f["name"],
            str(f["version"]),
            "yes" if f["enabled"] else "no",
            _trigger_text(f["trigger"]),
        ]
        for f in data
    ]
    print(_table(rows, ["ID", "NAME", "VERSION", "ENABLED", "TRIGGER"]))
    return 0


def cmd_flows_run(args: argparse.Namespace) -> int:
    """Start a run of flow NAME with ``--data`` as its trigger body; ``--sync`` follows it."""
    body: bytes | None = None
    if args.data is not None:
        try:
            orjson.loads(args.data)
        except orjson.JSONDecodeError as exc:
            print(f"conveyor: --data is not valid JSON: {exc}", file=sys.stderr)
            return EXIT_USAGE
        body = args.data.encode()
    client = _client(args)
    flow = _find_flow(client, args.name)
    started = client.request(
        "POST",
        f"/api/v1/flows/{flow['id']}/run",
        data=body,
        content_type="application/json" if body is not None else None,
    )
    run_id = started["run_id"]
    if not args.sync:
        if args.json:
            _print_json(started)
        else:
            print(f"run {run_id} {started['status']} (flow {flow['name']!r})")
        return EXIT_OK
    return _follow(client, run_id, args.interval, args.json, quiet=not args.json)


def _set_enabled(args: argparse.Namespace, enabled: bool) -> int:
    client = _client(args)
    flow = _find_flow(client, args.name)
    action = "enable" if enabled else "disable"
    client.request("POST", f"/api/v1/flows/{flow['id']}/{action}")
    print(f"flow {flow['name']!r} {action}d")
    return EXIT_OK


def cmd_flows_enable(args: argparse.Namespace) -> int:
    return _set_enabled(args, True)


def cmd_flows_disable(args: argparse.Namespace) -> int:
    return _set_enabled(args, False)


def cmd_flows_delete(args: argparse.Namespace) -> int:
    client = _client(args)
    flow = _find_flow(client, args.name)
    client.request("DELETE", f"/api/v1/flows/{flow['id']}")
    print(f"flow {flow['name']!r} deleted")
    return EXIT_OK


def cmd_runs_list(args: argparse.Namespace) -> int:
    client = _client(args)
    query = [f"limit={args.limit}"]
    if args.flow:
        query.append(f"flow_id={_find_flow(client, args.flow)['id']}")
    if args.status:
        query.append(f"status={args.status}")
    data = client.request("GET", "/api/v1/flow-runs?" + "&".join(query))["data"]
    names = {f["id"]: f["name"] for f in client.paged("/api/v1/flows")} if data else {}
    for run in data:
        run["flow_name"] = names.get(run["flow_id"])
    if args.json:
        _print_json(data)
        return EXIT_OK
    rows = [
        [
            r["id"],
            r["flow_name"] or f"(deleted) {r['flow_id']}",
            str(r["flow_version"]),
            r["status"],
            r["created_at"] or "",
            "" if r["duration_ms"] is None else f"{r['duration_ms']:.1f}",
        ]
        for r in data
    ]
    print(_table(rows, ["ID", "FLOW", "VERSION", "STATUS", "CREATED", "MS"]))
    return EXIT_OK


def _short(value: object, width: int = 60) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _run_exit(run: dict[str, Any]) -> int:
    return EXIT_OK if run["status"] == "SUCCEEDED" else EXIT_FAILED


def _flow_name(client: ApiClient, flow_id: str) -> str | None:
    """The name of flow ``flow_id``, or None when it has been deleted."""
    try:
        flow: dict[str, Any] = client.request("GET", f"/api/v1/flows/{quote(flow_id)}")
    except ApiClientError as exc:
        if exc.status == 404:
            return None
        raise
    return str(flow["name"])


def cmd_runs_show(args: argparse.Namespace) -> int:
    client = _client(args)
    run = client.request("GET", f"/api/v1/flow-runs/{_run_ref(args.id)}")
    run["flow_name"] = _flow_name(client, run["flow_id"])
    if args.json:
        _print_json(run)
        return EXIT_OK
    flow = repr(run["flow_name"]) if run["flow_name"] else f"(deleted) {run['flow_id']}"
    print(
        f"run {run['id']}  flow {flow} v{run['flow_version']}  {run['status']}"
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
    return EXIT_OK


def _follow(client: ApiClient, run_id: str, interval_s: float, as_json: bool, quiet: bool) -> int:  # noqa: PLR0912 - one loop, three output modes (json, quiet, table)
    """Poll the run until it is terminal, printing each change of status and each step
    recorded (as JSON lines with ``as_json``; only the outcome with ``quiet``)."""
    seen: set[tuple[Any, ...]] = set()
    status = None
    while True:
        run = client.request("GET", f"/api/v1/flow-runs/{run_id}")
        terminal = run["status"] in TERMINAL
        for step in run["steps"]:
            key = (step["name"], step["parent"], step["iteration"], step["attempt"], step["status"])
            if key in seen:
                continue
            seen.add(key)
            if as_json:
                if not terminal:  # the terminal run's line below carries every step
                    print(orjson.dumps({"step": step}).decode(), flush=True)
            elif not quiet:
                where = f"{step['parent']}[{step['iteration']}]." if step["parent"] else ""
                print(
                    f"  step {where}{step['name']}  {step['status']}"
                    f"  {step['duration_ms'] or 0:.1f} ms",
                    flush=True,
                )
        if as_json and terminal:
            print(orjson.dumps(run).decode(), flush=True)
            return _run_exit(run)
        if run["status"] != status:
            status = run["status"]
            if as_json:
                print(orjson.dumps({"status": status}).decode(), flush=True)
            elif not quiet or terminal:
                print(f"run {run_id} {status}", flush=True)
        if terminal:
            if not as_json:
                if run["error"] is not None:
                    print(f"error: {_short(run['error'], 500)}")
                elif run["output"] is not None:
                    print(orjson.dumps(run["output"]).decode())
            return _run_exit(run)
        time.sleep(interval_s)


def cmd_runs_follow(args: argparse.Namespace) -> int:
    """Print the run's status and steps as they happen; exit when it is terminal."""
    return _follow(_client(args), _run_ref(args.id), args.interval, args.json, quiet=False)


def cmd_runs_retry(args: argparse.Namespace) -> int:
    client = _client(args)
    run_id = _run_ref(args.id)
    run = client.request(
        "POST", f"/api/v1/flow-runs/{run_id}/retry", json={"strategy": args.strategy}
    )
    if args.follow:
        return _follow(client, run_id, args.interval, args.json, quiet=False)
    if args.json:
        _print_json(run)
    else:
        print(f"run {run['id']} {run['status']} (retried {args.strategy})")
    return EXIT_OK


def cmd_runs_cancel(args: argparse.Namespace) -> int:
    run = _client(args).request("POST", f"/api/v1/flow-runs/{_run_ref(args.id)}/cancel")
    if args.json:
        _print_json(run)
    else:
        print(f"run {run['id']} {run['status']}")
    return EXIT_OK


def cmd_secrets_list(args: argparse.Namespace) -> int:
    data = _client(args).request("GET", "/api/v1/secrets")["data"]
    if args.json:
        _print_json(data)
    else:
        print("\n".join(s["name"] if isinstance(s, dict) else str(s) for s in data))
    return EXIT_OK


def cmd_secrets_set(args: argparse.Namespace) -> int:
    """The value is read from standard input, never from the command line (shell history)."""
    value = sys.stdin.read()
    if value.endswith("\n"):
        value = value[:-1]
    _client(args).request("PUT", f"/api/v1/secrets/{quote(args.name)}", json={"value": value})
    print(f"secret {args.name} set")
    return 0


def _limit(text: str) -> int:
    """``--limit``: an integer from 1 to 200 (the API's page size), else a usage error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 1 <= value <= 200:
        raise argparse.ArgumentTypeError(f"{value} is not between 1 and 200")
    return value


def _add_runs(
    sub: Any,
    group: dict[str, Any],
    common: list[argparse.ArgumentParser],
    polling: list[argparse.ArgumentParser],
) -> None:
    """``conveyor runs …``: ``common`` parents give --url/--json, ``polling`` adds --interval."""
    runs = sub.add_parser("runs", help="inspect runs", **group).add_subparsers(
        dest="sub", required=True
    )
    rlist = runs.add_parser("list", parents=common, help="list runs, newest first")
    rlist.add_argument("--flow", help="flow name or id")
    rlist.add_argument("--status", choices=list(RunStatus.__members__), help="run status")
    rlist.add_argument("--limit", type=_limit, default=50, help="1-200 (default 50)")
    rlist.set_defaults(func=cmd_runs_list)
    show = runs.add_parser("show", parents=common, help="a run and its step log")
    show.add_argument("id", help="run id (a UUID, as webhooks and runs list print it)")
    show.set_defaults(func=cmd_runs_show)
    follow = runs.add_parser(
        "follow",
        parents=polling,
        help="print a run's status and steps live until it ends; exit 1 unless it succeeded",
        description=FOLLOW_JSON_HELP,
    )
    follow.add_argument("id", help="run id")
    follow.set_defaults(func=cmd_runs_follow)
    retry = runs.add_parser("retry", parents=polling, help="retry a finished run")
    retry.add_argument("id", help="run id")
    retry.add_argument(
        "--strategy",
        choices=["FROM_FAILED_STEP", "ON_LATEST_VERSION"],
        default="FROM_FAILED_STEP",
        help="FROM_FAILED_STEP (default): same flow version, the steps before the failed one "
        "keep their outputs; ON_LATEST_VERSION: start over on the flow's current version",
    )
    retry.add_argument("--follow", action="store_true", help="then follow it like runs follow")
    retry.set_defaults(func=cmd_runs_retry)
    cancel = runs.add_parser(
        "cancel", parents=common, help="cancel a queued, running or paused run"
    )
    cancel.add_argument("id", help="run id")
    cancel.set_defaults(func=cmd_runs_cancel)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conveyor",
        description="Workflow automation on Redis Streams and PostgreSQL.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    group: dict[str, Any] = {
        "epilog": EXIT_CODES_HELP,
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }
    api = argparse.ArgumentParser(add_help=False)
    api.add_argument("--url", help="API base URL (default http://AP_HOST:AP_PORT)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON, for scripts")
    poll = argparse.ArgumentParser(add_help=False)
    poll.add_argument(
        "--interval", type=float, default=0.5, help="seconds between polls (default 0.5)"
    )

    flows = sub.add_parser("flows", help="manage flows", **group).add_subparsers(
        dest="sub", required=True
    )
    apply = flows.add_parser("apply", parents=[api], help="create a flow or save a new version")
    apply.add_argument("file", help="flow document (.json, .yaml or .yml)")
    apply.set_defaults(func=cmd_flows_apply)
    flows.add_parser("list", parents=[api, as_json], help="list flows").set_defaults(
        func=cmd_flows_list
    )
    frun = flows.add_parser(
        "run",
        parents=[api, as_json, poll],
        help="start a run of flow NAME (name or id)",
        description="Start a run (POST /api/v1/flows/{id}/run; any trigger type, enabled or "
        'not). Without --sync print its id (--json: {"run_id", "status"}); with --sync '
        "follow it like `runs follow`. " + FOLLOW_JSON_HELP,
    )
    frun.add_argument("name", help="flow name or id")
    frun.add_argument("--data", help="trigger body, a JSON document (default: no body)")
    frun.add_argument(
        "--sync", action="store_true", help="wait for the run to end; exit 1 unless it succeeded"
    )
    frun.set_defaults(func=cmd_flows_run)
    for verb, func, what in (
        ("enable", cmd_flows_enable, "enable flow NAME (its triggers fire again)"),
        ("disable", cmd_flows_disable, "disable flow NAME (webhooks refused, schedule stops)"),
        ("delete", cmd_flows_delete, "delete flow NAME"),
    ):
        verb_parser = flows.add_parser(verb, parents=[api], help=what)
        verb_parser.add_argument("name", help="flow name or id")
        verb_parser.set_defaults(func=func)

    _add_runs(sub, group, [api, as_json], [api, as_json, poll])

    secrets = sub.add_parser("secrets", help="manage secrets", **group).add_subparsers(
        dest="sub", required=True
    )
    sset = secrets.add_parser(
        "set",
        parents=[api],
        help="set NAME to the value read from stdin (one trailing newline is dropped)",
    )
    sset.add_argument("name", help="secret name ([A-Za-z_][A-Za-z0-9_]*), used as {{secrets.NAME}}")
    sset.set_defaults(func=cmd_secrets_set)
    secrets.add_parser("list", parents=[api, as_json], help="list secret names").set_defaults(
        func=cmd_secrets_list
    )
    return parser


def _report_api_error(exc: ApiClientError) -> int:
    """One line (plus one per validation problem) on stderr; the exit code for ``exc``."""
    details = [d for d in exc.details or [] if isinstance(d, dict)]
    if details:
        count = f"{len(details)} problem" + ("s" if len(details) > 1 else "")
        print(f"conveyor: {exc.status} {exc.code}: {count}:", file=sys.stderr)
        for detail in details:
            print(
                f"  {detail.get('path') or '(document)'}: {detail.get('message')}", file=sys.stderr
            )
    else:
        print(f"conveyor: {exc}", file=sys.stderr)
    if exc.status == 401:
        print(
            "  the CLI sends AP_API_KEY from its environment: set it to the server's key",
            file=sys.stderr,
        )
    if exc.status == 0:
        return EXIT_UNREACHABLE
    return EXIT_NOT_FOUND if exc.status == 404 else EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        sys.stdout.flush()
    except NotFound as exc:
        print(f"conveyor: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except ApiClientError as exc:
        return _report_api_error(exc)
    except BrokenPipeError:
        # The reader of stdout went away (`| head`): stop quietly, and point stdout at
        # /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
