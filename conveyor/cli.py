"""The ``conveyor`` command: ``up``, ``migrate``, ``config`` and ``--version``.

Settings are parsed once here; a bad value prints one line naming the variable, the value and
what is allowed, and exits with code 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from conveyor import __version__
from conveyor.settings import Settings, SettingsError


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        print(f"conveyor: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_up(args: argparse.Namespace) -> int:
    from conveyor.runtime import run  # noqa: PLC0415 - keep `conveyor config` light

    return run(_settings())


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
