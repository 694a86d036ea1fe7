"""The stream route of a head routed before, without walking the rules again.

Why: ``Application.find_handler`` walks the application's rules in Python,
calling each matcher and router in turn, for every request; for a head whose
bytes were already routed to a stream endpoint (but for the query of its
request line) the walk gives the same answer, provided the answer depends
on nothing but those bytes. It does when every rule uses one of Tornado's
own matchers (path, host, default host, any), every router is one of
Tornado's own, and every target is a router, a ``RequestHandler`` class or
an :class:`~sse_handler.routing.EventStreamRoute`: those look only at the
path, the host and the headers, never at the query. Any other matcher,
router or target (a callable, a connection delegate, a subclass) may look at
something else (the client's address, the time), and then nothing is
remembered. Rules added or replaced later (``add_handlers``, ``add_rules``,
an assignment into a router's list) are seen: each rule list walked is
compared with its copy on each use (the rules themselves, by identity), as
are the application's router and ``default_host``; a change forgets
everything.
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
        # The same by the whole head remembered: the same head again is
        # found by one hash and no slicing.
        self._by_head: dict[bytes, tuple[ServerSentEventHandler, dict[str, bytes | None]]] = {}
        # Each router walked, its rule list, and a copy of it then; None: not
        # walked yet. And what Application.find_handler reads besides.
        self._walked: list[tuple[RuleRouter, list[Rule], list[Rule]]] | None = None
        self._app_state: tuple[object, object] = (None, None)
        self._pure = False

    def __len__(self) -> int:
        return len(self._routes)

    def find(self, head: bytes, request: HTTPServerRequest) -> StreamRequest | None:
        """The delegate ``app.find_handler(request)`` gives, if ``head`` was
        routed to a stream before and the rules say the same again; else
        ``None`` (ask the application)."""
        if not self._current():
            return None
        route = self._by_head.get(head) or self._routes.get(_without_query(head))
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
        if len(self._by_head) >= self.limit:
            self._by_head.clear()
        route = (delegate.handler, dict(delegate.path_kwargs))
        self._routes[_without_query(head)] = self._by_head[head] = route

    def _current(self) -> bool:
        """Whether routing depends on the head alone (walked again, and the
        routes forgotten, once the rules have changed)."""
        walked = self._walked
        app = self.app
        app_state = (app.default_router, app.default_host)
        if walked is not None and app_state == self._app_state:
            for router, rules, then in walked:
                if router.rules is not rules or rules != then:
                    break
            else:
                return self._pure
        self._routes.clear()
        self._by_head.clear()
        self._walked = []
        self._app_state = app_state
        self._pure = type(app).find_handler is Application.find_handler and _by_head_alone(
            app.default_router, self._walked
        )
        return self._pure


def _without_query(head: bytes) -> bytes:
    """``head`` without the query of its request line (``?`` to the space
    before the version): what routing may depend on."""
    eol = head.find(b"\n")
    mark = head.find(b"?", 0, eol)
    if mark < 0:
        return head
    # The target has no space (Tornado's request line has exactly two).
    end = head.find(b" ", mark, eol)
    return head if end < 0 else head[:mark] + head[end:]


def _by_head_alone(
    router: Router, walked: list[tuple[RuleRouter, list[Rule], list[Rule]]]
) -> bool:
    if type(router) not in _ROUTERS:
        return False
    assert isinstance(router, RuleRouter)
    rules = router.rules
    walked.append((router, rules, list(rules)))
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
