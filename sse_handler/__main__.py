"""The command line: ``python -m sse_handler <command>`` (also ``sse-handler``).

Commands:

``demo [--host HOST] [--port PORT] [--admin-token TOKEN] [--redis URL]``
    Serve the demo page, its stream and the publish endpoint
    (:mod:`sse_handler.demo`) until SIGINT or SIGTERM. The admin API
    (:mod:`sse_handler.admin`) is mounted only with ``--admin-token``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from .demo.app import serve

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, return the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    status: int = args.run(args)
    return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sse_handler", description="Server-Sent Events for Tornado."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="serve the demo page and stream",
        description="Serve the demo page and stream.",
    )
    demo.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    demo.add_argument(
        "--port", type=int, default=8888, help="port to listen on (default: %(default)s)"
    )
    demo.add_argument(
        "--admin-token",
        type=_token,
        default=None,
        metavar="TOKEN",
        help="enable the admin API under /admin, guarded by 'Authorization: Bearer TOKEN'",
    )
    demo.add_argument(
        "--redis",
        default=None,
        metavar="URL",
        help="fan out through Redis Streams at URL (e.g. redis://127.0.0.1:6379/0); "
        "default: an in-memory broker",
    )
    demo.set_defaults(run=_run_demo)
    return parser


def _token(value: str) -> str:
    if not value:
        raise argparse.ArgumentTypeError("the admin token must not be empty")
    return value


def _run_demo(args: argparse.Namespace) -> int:
    asyncio.run(serve(args.host, args.port, args.admin_token, args.redis))
    return 0


if __name__ == "__main__":
    sys.exit(main())
