"""sse_handler's demo over HTTPS (the TLS scenarios).

``python sse_handler_tls_app.py --port P --certfile C --keyfile K``, run in the
directory that holds the bench's copy of ``sse_handler/`` (as ``python -m
sse_handler demo`` is), or a ``--baseline`` one.

The demo as ``python -m sse_handler demo`` serves it, the same routes and the
same serving code (:func:`sse_handler.demo.app.serve`: listen backlog,
collector settings, shutdown), with one change: the ``HTTPServer`` that
:func:`~sse_handler.server.make_server` builds for it gets
``ssl_options=<an ssl.SSLContext with the certificate>``, Tornado's own way to
serve HTTPS. A demo whose ``serve()`` takes ``ssl_context`` (commit 2e0dab3 and
later) is given the context that way; an older one (a ``--baseline``) gets it
through the module's ``make_server``. Either way the same context reaches the
same ``HTTPServer`` argument. The library is not changed.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import os
import ssl
import sys
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--certfile", required=True)
    parser.add_argument("--keyfile", required=True)
    args = parser.parse_args()
    # A script's own directory comes first on sys.path; the bench serves
    # sse_handler from its copy in the current directory, as `python -m` would.
    sys.path.insert(0, os.getcwd())
    from sse_handler.demo import app as demo
    from sse_handler.server import make_server

    ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ssl_ctx.load_cert_chain(args.certfile, args.keyfile)

    serve_kwargs: dict[str, Any] = {}
    if "ssl_context" in inspect.signature(demo.serve).parameters:
        # The demo serves HTTPS itself (it passes ssl_options to make_server).
        serve_kwargs["ssl_context"] = ssl_ctx
    else:

        def make_tls_server(*args: Any, **kwargs: Any) -> Any:
            return make_server(*args, ssl_options=ssl_ctx, **kwargs)

        # serve() builds its server through the module's make_server: it gets this one.
        demo.make_server = make_tls_server  # type: ignore[attr-defined]
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("bench").info(
        "sse_handler from %s over TLS (%s)", os.path.dirname(demo.__file__), args.certfile
    )
    asyncio.run(demo.serve(args.host, args.port, **serve_kwargs))


if __name__ == "__main__":
    main()
