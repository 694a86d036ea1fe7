"""sse_handler's demo with a write deadline that fits a 10 s run (the ``frozen`` scenario).

``python sse_handler_frozen_app.py --port P``, run in the directory that holds
the bench's copy of ``sse_handler/`` (as ``python -m sse_handler demo`` is).

The demo's handler keeps the library's defaults, ``write_timeout = 30 s`` and
``max_queue_bytes = 1 MiB``: a frozen reader would outlive the run. This app is
the demo, the same routes (``/``, ``/events``, ``/publish``, ``/metrics``) and
the same serving code (:func:`sse_handler.demo.app.serve`: listen backlog,
collector settings, shutdown), with only those two settings lowered on the
handler that :func:`~sse_handler.demo.app.make_app` builds:
``write_timeout = 2 s`` and ``max_queue_bytes = 256 KiB``. A handler that
freezes its settings into ``write_limits`` when it is built (the connection core
v2, commit 6224592 and later) gets them there too; an older one reads the
attributes per connection. The library is not changed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
from typing import Any

WRITE_TIMEOUT = 2.0
MAX_QUEUE_BYTES = 256 * 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # A script's own directory comes first on sys.path; the bench serves
    # sse_handler from its copy in the current directory, as `python -m` would.
    sys.path.insert(0, os.getcwd())
    from sse_handler.demo import app as demo

    make_app = demo.make_app

    def make_tuned_app(*args: Any, **kwargs: Any) -> Any:
        app, handler = make_app(*args, **kwargs)
        handler.write_timeout = WRITE_TIMEOUT
        handler.max_queue_bytes = MAX_QUEUE_BYTES
        limits = getattr(handler, "write_limits", None)
        if limits is not None:
            # Every connection's write path takes its bounds from here.
            handler.write_limits = dataclasses.replace(
                limits, write_timeout=WRITE_TIMEOUT, max_queue_bytes=MAX_QUEUE_BYTES
            )
        return app, handler

    # serve() builds its app through the module's make_app: it gets this one.
    demo.make_app = make_tuned_app
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("bench").info(
        "sse_handler from %s: write_timeout=%g s, max_queue_bytes=%d",
        os.path.dirname(demo.__file__),
        WRITE_TIMEOUT,
        MAX_QUEUE_BYTES,
    )
    asyncio.run(demo.serve(args.host, args.port))


if __name__ == "__main__":
    main()
