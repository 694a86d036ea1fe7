"""The demo: ``python -m sse_handler demo`` serves a page, a stream and a publish form.

See :mod:`sse_handler.demo.app` for the routes; :func:`make_app` builds the
application in-process (as the tests do) and :func:`serve` runs it until
SIGINT or SIGTERM.
"""

from .app import DemoConnection, DemoHandler, make_app, serve

__all__ = ["DemoConnection", "DemoHandler", "make_app", "serve"]
