"""The command line: ``python -m sse_handler <command>`` (also ``sse-handler``).

Commands:

``demo [--host H] [--port P] [--admin-token T] [--redis URL] [--tls-cert F --tls-key F]``
    Serve the demo page, its stream and the publish endpoint
    (:mod:`sse_handler.demo`) until SIGINT or SIGTERM. The admin API
    (:mod:`sse_handler.admin`) is mounted only with ``--admin-token``; with
    ``--redis`` it reaches every demo process on that Redis, and
    ``--presence-ttl SECONDS`` bounds how long a crashed process stays in
    presence (default 15). With
    ``--tls-cert`` and ``--tls-key`` (PEM files, as
    :meth:`ssl.SSLContext.load_cert_chain` takes them; both or neither)
    everything is served over HTTPS. With ``--jwt-secret`` (HS256, at least
    32 bytes) the streams and ``/publish`` require a JWT, and ``/tickets``
    issues single-use stream tickets (docs/authentication.md).

``--version`` prints ``sse-handler <version>``.

What a user gets wrong is one line on stderr, never a traceback: exit status
2 for a usage error (argparse's usage line comes first), 1 when the command
cannot start (the port is taken, TLS files that do not load, ``--redis``
without the ``redis`` extra installed or with no Redis answering at the URL).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import importlib.metadata
import logging
import socket
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from .demo.app import serve

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, return the exit status."""
    args = _parser(_prog()).parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    status: int = args.run(args)
    return status


def _prog() -> str:
    """The command's name as the user typed it: ``python -m sse_handler`` runs
    this file as ``__main__``, the ``sse-handler`` script calls :func:`main`."""
    return "python -m sse_handler" if Path(sys.argv[0]).name == "__main__.py" else "sse-handler"


def _version() -> str:
    try:
        return importlib.metadata.version("sse_handler")
    except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path
        return "unknown (not installed)"


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Server-Sent Events for Tornado.")
    parser.add_argument("--version", action="version", version=f"sse-handler {_version()}")
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
        "--presence-ttl",
        type=_positive_seconds,
        default=None,
        metavar="SECONDS",
        help="with --redis: a crashed process leaves presence within SECONDS (default: 15)",
    )
    demo.add_argument(
        "--history-size",
        type=_event_count,
        default=1000,
        metavar="N",
        help="events kept per channel for clients that resume with Last-Event-ID "
        "(default: %(default)s)",
    )
    demo.add_argument(
        "--coalesce-window",
        type=_window_ms,
        default=0.0,
        metavar="MS",
        help="events for one stream that arrive within MS milliseconds leave in one write "
        "(adds up to MS of latency to every event; default: 0, off)",
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
    demo.add_argument(
        "--jwt-secret",
        type=_jwt_secret,
        default=None,
        metavar="SECRET",
        help="require a JWT (HS256 with this secret; sub, exp and a channels claim) on the "
        "streams and /publish, and issue stream tickets at POST /tickets",
    )
    demo.set_defaults(run=_run_demo, usage_error=demo.error, prog=demo.prog)
    return parser


def _positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, not {value!r}")
    return seconds


def _event_count(value: str) -> int:
    count = int(value) if value.isascii() and value.isdigit() else 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of events, not {value!r}")
    return count


def _window_ms(value: str) -> float:
    try:
        ms = float(value)
    except ValueError:
        ms = -1.0
    if not 0 <= ms < float("inf"):
        raise argparse.ArgumentTypeError(f"expected milliseconds >= 0, not {value!r}")
    return ms / 1000


def _token(value: str) -> str:
    if not value:
        raise argparse.ArgumentTypeError("the admin token must not be empty")
    return value


def _jwt_secret(value: str) -> str:
    if not value:
        raise argparse.ArgumentTypeError("the secret must not be empty")
    if len(value.encode("utf-8")) < 32:
        # The demo takes it (its contract is `--jwt-secret SECRET`), and says so.
        print(
            "sse-handler: warning: a JWT secret under 32 bytes is weak (RFC 7518, "
            "section 3.2); e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'",
            file=sys.stderr,
        )
    try:
        import jwt  # noqa: F401
    except ImportError:
        raise argparse.ArgumentTypeError(
            "--jwt-secret needs the jwt extra: pip install 'sse_handler[jwt]'"
        ) from None
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
    if args.presence_ttl is not None and args.redis is None:
        args.usage_error("--presence-ttl needs --redis")
    if args.redis is not None:
        try:
            scheme = urlsplit(args.redis).scheme
        except ValueError:
            scheme = ""
        if scheme not in _REDIS_SCHEMES:
            args.usage_error(
                f"--redis {_redacted(args.redis)}: not a Redis URL "
                "(redis://, rediss:// or unix://)"
            )
    try:
        asyncio.run(_demo(args, ssl_context))
    except _CannotStart as exc:
        print(f"{args.prog}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if not _cannot_listen(exc):
            raise
        address = f"[{args.host}]" if ":" in args.host else args.host
        print(
            f"{args.prog}: error: cannot listen on {address}:{args.port}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    return 0


_REDIS_SCHEMES = ("redis", "rediss", "unix")


def _cannot_listen(exc: OSError) -> bool:
    """Is ``exc`` a failure to bind the listening socket (address taken, not
    local, privileged port, unknown host name)? Nothing else the demo does
    raises these."""
    return isinstance(exc, socket.gaierror) or exc.errno in (
        errno.EADDRINUSE,
        errno.EADDRNOTAVAIL,
        errno.EACCES,
    )


async def _demo(args: argparse.Namespace, ssl_context: ssl.SSLContext | None) -> None:
    if args.redis is not None:
        await _check_redis(args.redis)
    await serve(
        args.host,
        args.port,
        args.admin_token,
        args.redis,
        ssl_context,
        redis_cluster=args.redis_cluster,
        jwt_secret=args.jwt_secret,
        presence_ttl=args.presence_ttl,
        coalesce_window=args.coalesce_window,
        history_size=args.history_size,
    )


async def _check_redis(url: str) -> None:
    """Fail at start, not at the first publish, when the ``redis`` extra is
    missing or nothing answers ``PING`` at ``url``. Later outages are the
    broker's to ride out."""
    try:
        from redis import asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import RedisError
    except ImportError:
        raise _CannotStart(
            "--redis needs the redis extra: pip install 'sse_handler[redis]'"
        ) from None
    try:
        client = aioredis.from_url(
            url, socket_connect_timeout=5, socket_timeout=5, retry=Retry(NoBackoff(), 0)
        )
    except ValueError as exc:
        raise _CannotStart(f"--redis {_redacted(url)}: {exc}") from None
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        raise _CannotStart(f"no Redis answers at --redis {_redacted(url)}: {exc}") from None
    finally:
        await client.aclose()


def _redacted(url: str) -> str:
    """``url`` without its password, fit for stderr and logs."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if not password:
        return url
    netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


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
