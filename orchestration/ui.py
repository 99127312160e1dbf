"""Start the Dagster UI on the main command's instance: ``python -m orchestration.ui --data DIR``.

Binds to 127.0.0.1 (this machine only) unless ``--host`` or ``$BLIP_OPS_UI_HOST`` names another
address: the UI has no login and launches runs, so expose it only behind an authenticating
proxy. ``DAGSTER_HOME`` is ``DIR/dagster_home`` (the instance the main command
records its runs in, telemetry off), and the storage resource reads and writes ``DIR``, so what
``python -m orchestration.main --data DIR`` materialized is in the UI with its metadata and plots,
and anything can be (re-)materialized from there. Before starting, the shapes world is landed
and its shards added as partitions when the landing area is empty (``--no-land`` skips that).
"""

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import orchestration  # noqa: F401  (telemetry off first)
from orchestration.main import prepare_home

LOOPBACK = "127.0.0.1"
HOST_ENV = "BLIP_OPS_UI_HOST"


def dev_command(port: int, host: str = LOOPBACK) -> list[str]:
    """The ``dagster dev`` command line serving ``orchestration.definitions``."""
    return [sys.executable, "-m", "dagster", "dev", "-m", "orchestration.definitions",
            "-h", host, "-p", str(port)]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of :func:`main` (``--host`` defaults to ``$BLIP_OPS_UI_HOST``, else 127.0.0.1)."""
    p = argparse.ArgumentParser(prog="python -m orchestration.ui",
                                description="The Dagster UI (asset graph, checks, runs) on 127.0.0.1.")
    p.add_argument("--data", type=Path, default=Path("data"), help="data folder (default: data)")
    p.add_argument("--port", type=int, default=3000, help="port (default: 3000)")
    p.add_argument("--host", default=os.environ.get(HOST_ENV) or LOOPBACK,
                   help=f"address to bind (default: ${HOST_ENV}, else {LOOPBACK}: this machine only)")
    p.add_argument("--no-land", action="store_true",
                   help="do not land the shapes world when the landing area is empty")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Prepare the instance, then replace this process with ``dagster dev``."""
    args = parse_args(argv)
    home = prepare_home(args.data)
    if not args.no_land:
        from dagster import DagsterInstance

        from orchestration.main import land_shapes_world, register_shards
        from resources.storage import storage_from_env

        storage = storage_from_env()

        print(land_shapes_world(storage).describe(storage), flush=True)
        with DagsterInstance.get() as instance:
            register_shards(instance, storage)
    print(f"Dagster UI on http://{args.host}:{args.port} (DAGSTER_HOME={home})", flush=True)
    if args.host not in (LOOPBACK, "localhost", "::1"):
        print(f"warning: the UI (no login) is reachable from other machines on {args.host}:{args.port}",
              file=sys.stderr, flush=True)
    cmd = dev_command(args.port, args.host)
    sys.stdout.flush()
    os.execv(cmd[0], cmd)  # signals (Ctrl-C) now reach dagster dev directly


if __name__ == "__main__":
    sys.exit(main())
