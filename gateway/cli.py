"""Command line: ``shardgate run|demo|validate|route|plan`` (``python -m gateway`` is the same)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

from gateway import offline
from gateway.config import ConfigError, settings_from
from gateway.observability.logs import configure_logging, log_format

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardgate", description="Sharding HTTP gateway with strict write ownership."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the gateway")
    source = run.add_mutually_exclusive_group()
    source.add_argument("--config", metavar="PATH", help="shard config file (SHARDGATE_CONFIG)")
    source.add_argument("--configmap", metavar="NAME", help="shard config ConfigMap (SHARDGATE_CONFIGMAP)")
    run.add_argument("--namespace", metavar="NS", help="ConfigMap/Service namespace (SHARDGATE_NAMESPACE)")
    run.add_argument("--listen", metavar="HOST:PORT", help="proxy address (SHARDGATE_LISTEN)")
    run.add_argument("--admin-listen", metavar="HOST:PORT", help="admin address (SHARDGATE_ADMIN_LISTEN)")
    run.add_argument("--workers", metavar="N", type=int, help="worker processes (SHARDGATE_WORKERS)")
    run.add_argument(
        "--drain-delay",
        metavar="SECONDS",
        type=float,
        help="after SIGTERM, serve this long while not ready (SHARDGATE_DRAIN_DELAY, default 5)",
    )
    run.add_argument(
        "--grace-timeout",
        metavar="SECONDS",
        type=float,
        help="then wait this long for in-flight requests (SHARDGATE_GRACE_TIMEOUT, default 20)",
    )
    run.add_argument("--log-level", metavar="LEVEL", help="log level (SHARDGATE_LOG_LEVEL, default INFO)")

    demo = commands.add_parser("demo", help="local demo: 3 shard groups x 2 pods behind the gateway")
    demo.add_argument("--listen", metavar="HOST:PORT", help="proxy address (default 127.0.0.1:8080)")
    demo.add_argument("--admin-listen", metavar="HOST:PORT", help="admin address")

    validate = commands.add_parser("validate", help="check a shard config file")
    validate.add_argument("path", metavar="PATH")

    route = commands.add_parser("route", help="print the owning group of each key")
    route.add_argument("--config", metavar="PATH", required=True)
    route.add_argument("keys", metavar="KEY", nargs="+")

    plan = commands.add_parser("plan", help="what a config change moves, per (from -> to) group pair")
    plan.add_argument("old", metavar="OLD")
    plan.add_argument("new", metavar="NEW")
    return parser


def log_level(flag: str | None, env: Mapping[str, str]) -> str:
    """The level from the flag, else SHARDGATE_LOG_LEVEL, else INFO; ConfigError if unknown."""
    level = (flag or env.get("SHARDGATE_LOG_LEVEL") or "INFO").strip().upper()
    if level not in LOG_LEVELS:
        raise ConfigError([f"SHARDGATE_LOG_LEVEL: {level!r} is not a log level ({', '.join(LOG_LEVELS)})"])
    return level


def cmd_run(args: argparse.Namespace) -> int:
    try:
        level = log_level(args.log_level, os.environ)
        fmt = log_format(os.environ)
        settings = settings_from(
            config_path=args.config,
            configmap=args.configmap,
            namespace=args.namespace,
            listen=args.listen,
            admin_listen=args.admin_listen,
            workers=args.workers,
            drain_delay=args.drain_delay,
            grace_timeout=args.grace_timeout,
        )
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"shardgate run: {problem}", file=sys.stderr)
        return 2
    configure_logging(level, fmt)
    from gateway.app import run_gateway  # the data plane is only imported when it runs

    return run_gateway(settings)


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import main as demo_main

    return demo_main(listen=args.listen, admin_listen=args.admin_listen)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else 2
    if args.command == "run":
        return cmd_run(args)
    if args.command == "demo":
        return cmd_demo(args)
    if args.command == "validate":
        return offline.validate(args.path, sys.stdout, sys.stderr)
    if args.command == "route":
        return offline.route(args.config, args.keys, sys.stdout, sys.stderr)
    return offline.plan(args.old, args.new, sys.stdout, sys.stderr)
