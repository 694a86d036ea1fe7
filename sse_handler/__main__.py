"""The command line: ``python -m sse_handler <command>`` (also ``sse-handler``).

Commands:

``demo [--host H] [--port P] [--admin-token T] [--redis URL] [--tls-cert F --tls-key F]``
    Serve the demo page, its stream and the publish endpoint
    (:mod:`sse_handler.demo`) until SIGINT or SIGTERM. The admin API
    (:mod:`sse_handler.admin`) is mounted only with ``--admin-token``. With
    ``--tls-cert`` and ``--tls-key`` (PEM files, as
    :meth:`ssl.SSLContext.load_cert_chain` takes them; both or neither)
    everything is served over HTTPS.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
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
    demo.add_argument(
        "--redis-cluster",
        action="store_true",
        help="the --redis URL is a node of a Redis Cluster; channels are grouped (and "
        "sharded) by their name up to the first ':'",
    )
    demo.add_argument(
        "--tls-cert",
        default=None,
        metavar="FILE",
        help="serve over HTTPS with this certificate (PEM; the chain may follow it); "
        "needs --tls-key",
    )
    demo.add_argument(
        "--tls-key",
        default=None,
        metavar="FILE",
        help="the certificate's private key (PEM, unencrypted; may be the --tls-cert file); "
        "needs --tls-cert",
    )
    demo.set_defaults(run=_run_demo, usage_error=demo.error, prog=demo.prog)
    return parser


def _token(value: str) -> str:
    if not value:
        raise argparse.ArgumentTypeError("the admin token must not be empty")
    return value


class _CannotStart(Exception):
    """Why the command cannot start, in one line for stderr."""


def _run_demo(args: argparse.Namespace) -> int:
    if (args.tls_cert is None) != (args.tls_key is None):
        args.usage_error("--tls-cert and --tls-key go together: give both or neither")
    ssl_context = None
    if args.tls_cert is not None:
        try:
            ssl_context = _tls_context(args.tls_cert, args.tls_key)
        except _CannotStart as exc:
            print(f"{args.prog}: error: {exc}", file=sys.stderr)
            return 1
    asyncio.run(
        serve(
            args.host,
            args.port,
            args.admin_token,
            args.redis,
            ssl_context,
            redis_cluster=args.redis_cluster,
        )
    )
    return 0


class _EncryptedKey(Exception):
    pass


def _ask_for_password() -> bytes:
    # Without a callback OpenSSL would ask for the passphrase on the terminal.
    raise _EncryptedKey


def _tls_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """A server context holding ``certfile``'s chain and ``keyfile``'s key.

    Raises :class:`_CannotStart` naming the flag and the file at fault: the
    ``ssl`` module's own errors name neither.
    """
    pems = {}
    for flag, path in (("--tls-cert", certfile), ("--tls-key", keyfile)):
        try:
            with open(path, "rb") as file:
                pems[flag] = file.read()
        except OSError as exc:
            raise _CannotStart(f"cannot read {flag} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN CERTIFICATE-----" not in pems["--tls-cert"]:
        raise _CannotStart(f"--tls-cert {certfile} holds no PEM certificate")
    if b"PRIVATE KEY-----" not in pems["--tls-key"]:
        raise _CannotStart(f"--tls-key {keyfile} holds no PEM private key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certfile, keyfile, password=_ask_for_password)
    except _EncryptedKey:
        raise _CannotStart(f"--tls-key {keyfile} is encrypted; give the key unencrypted") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise _CannotStart(
                f"--tls-key {keyfile} is not the private key of --tls-cert {certfile}"
            ) from None
        raise _CannotStart(
            f"cannot load --tls-cert {certfile} with --tls-key {keyfile}: {exc}"
        ) from None
    except OSError as exc:  # the files changed since they were read
        raise _CannotStart(
            f"cannot read --tls-cert {certfile} or --tls-key {keyfile}: {exc.strerror or exc}"
        ) from None
    return context


if __name__ == "__main__":
    sys.exit(main())
