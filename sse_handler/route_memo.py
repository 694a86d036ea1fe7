"""The stream route of a head routed before, without walking the rules again.

Why: ``Application.find_handler`` walks the application's rules in Python,
calling each matcher and router in turn, for every request; for a head whose
bytes were already routed to a stream endpoint the walk gives the same
answer, provided the answer depends on nothing but those bytes. It does when
every rule uses one of Tornado's own matchers (path, host, default host,
any), every router is one of Tornado's own, and every target is a router, a
``RequestHandler`` class or an :class:`~sse_handler.routing.EventStreamRoute`:
those look only at the path, the host and the headers. Any other matcher,
router or target (a callable, a connection delegate, a subclass) may look at
something else (the client's address, the time), and then nothing is
remembered. Rules added later (``add_handlers``, ``add_rules``) are seen: the
rule lists' lengths are checked on each use, and a change forgets everything.
"""

from __future__ import annotations

from inspect import isclass
from typing import TYPE_CHECKING

from tornado.httputil import HTTPServerRequest
from tornado.routing import (
    AnyMatches,
    DefaultHostMatches,
    HostMatches,
    PathMatches,
    ReversibleRuleRouter,
    Router,
    Rule,
    RuleRouter,
)
from tornado.web import Application, RequestHandler

from .routing import EventStreamRoute, StreamRequest

if TYPE_CHECKING:
    from .handler import ServerSentEventHandler

__all__ = ["RouteMemo"]

_MATCHERS = frozenset({PathMatches, HostMatches, DefaultHostMatches, AnyMatches})
# Tornado's own routers, the Application's included (its class is private).
_ROUTERS = frozenset({RuleRouter, ReversibleRuleRouter, type(Application().wildcard_router)})


class RouteMemo:
    """The stream routes of up to ``limit`` heads of one application."""

    def __init__(self, app: Application, limit: int = 64) -> None:
        self.app = app
        self.limit = limit
        self._routes: dict[bytes, tuple[ServerSentEventHandler, dict[str, bytes | None]]] = {}
        # The rule lists walked, with their lengths then; None: not walked yet.
        self._walked: list[tuple[list[Rule], int]] | None = None
        self._pure = False

    def __len__(self) -> int:
        return len(self._routes)

    def find(self, head: bytes, request: HTTPServerRequest) -> StreamRequest | None:
        """The delegate ``app.find_handler(request)`` gives, if ``head`` was
        routed to a stream before and the rules say the same again; else
        ``None`` (ask the application)."""
        if not self._current():
            return None
        route = self._routes.get(head)
        if route is None:
            return None
        handler, path_kwargs = route
        return StreamRequest(handler, request, dict(path_kwargs))

    def remember(self, head: bytes, delegate: StreamRequest) -> None:
        """``head`` was routed to ``delegate`` by the application."""
        if not self._current():
            return
        if len(self._routes) >= self.limit:
            self._routes.clear()
        self._routes[head] = (delegate.handler, dict(delegate.path_kwargs))

    def _current(self) -> bool:
        """Whether routing depends on the head alone (walked again, and the
        routes forgotten, once a rule list has changed)."""
        walked = self._walked
        if walked is not None and all(len(rules) == n for rules, n in walked):
            return self._pure
        self._routes.clear()
        self._walked = []
        self._pure = type(self.app).find_handler is Application.find_handler and _by_head_alone(
            self.app.default_router, self._walked
        )
        return self._pure


def _by_head_alone(router: Router, walked: list[tuple[list[Rule], int]]) -> bool:
    if type(router) not in _ROUTERS:
        return False
    assert isinstance(router, RuleRouter)
    rules = router.rules
    walked.append((rules, len(rules)))
    for rule in rules:
        if type(rule.matcher) not in _MATCHERS:
            return False
        target = rule.target
        if type(target) is EventStreamRoute:
            continue
        if isclass(target) and issubclass(target, RequestHandler):
            continue
        if not (isinstance(target, Router) and _by_head_alone(target, walked)):
            return False
    return True
