"""Command line: ``shardgate run|demo|validate|route|plan`` (``python -m gateway`` is the same)."""

from __future__ import annotations

import argparse
import os
import sys

from gateway import offline
from gateway.config import ConfigError
from gateway.observability.logs import configure_logging
from gateway.observability.tracing import tracing_options
from gateway.settings import flag_help, load_settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardgate", description="Sharding HTTP gateway with strict write ownership."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the gateway")
    source = run.add_mutually_exclusive_group()
    source.add_argument("--config", metavar="PATH", help=flag_help("shard config file", "config_path"))
    source.add_argument("--configmap", metavar="NAME", help=flag_help("shard config ConfigMap", "configmap"))
    run.add_argument(
        "--namespace",
        metavar="NS",
        help=flag_help("ConfigMap/Service namespace", "namespace", "the pod's own, else default"),
    )
    run.add_argument("--listen", metavar="HOST:PORT", help=flag_help("proxy address", "listen"))
    run.add_argument("--admin-listen", metavar="HOST:PORT", help=flag_help("admin address", "admin_listen"))
    run.add_argument("--workers", metavar="N", type=int, help=flag_help("worker processes", "workers"))
    run.add_argument(
        "--drain-delay",
        metavar="SECONDS",
        type=float,
        help=flag_help("after SIGTERM, serve this long while not ready", "drain_delay"),
    )
    run.add_argument(
        "--grace-timeout",
        metavar="SECONDS",
        type=float,
        help=flag_help("then wait this long for in-flight requests", "grace_timeout"),
    )
    run.add_argument("--log-level", metavar="LEVEL", help=flag_help("log level", "log_level"))

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


def cmd_run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(
            config_path=args.config,
            configmap=args.configmap,
            namespace=args.namespace,
            listen=args.listen,
            admin_listen=args.admin_listen,
            workers=args.workers,
            drain_delay=args.drain_delay,
            grace_timeout=args.grace_timeout,
            log_level=args.log_level,
        )
        tracing_options(os.environ)  # the OTEL_* variables are checked before anything starts
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"shardgate run: {problem}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
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
