"""The kit that ``authorize()`` calls: :class:`StreamAuth`.

A stream request carries one credential, looked for in this order:

1. a ticket, ``?ticket=...`` (:mod:`sse_handler.auth.tickets`): taken from the
   store, so it works once; an unknown, spent or expired one is 401;
2. a JWT (:mod:`sse_handler.auth.jwt`) in ``Authorization: Bearer ...``, in a
   named cookie, or (discouraged: URLs are logged) in a named query parameter.

No credential, or a bad one: 401. A credential from a cookie is refused (403)
when the request comes from another site: an ``Origin`` that is neither the
stream's own nor listed in the handler's ``cors_origins``, or, without
``Origin``, ``Sec-Fetch-Site: cross-site`` / ``same-site``. A browser attaches
cookies to a credentialed ``EventSource`` (or a form POST) that any site
opens; without this check that site would open streams, or publish, as the
user (docs/authentication.md).

The result is a :class:`~sse_handler.grant.Grant`, which ``authorize()``
returns: the handler then checks the channels asked for against it (403),
gives the connection its ``subject`` and ends the stream with
``event: auth_expired`` when the credential expires.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable

from tornado.httputil import HTTPServerRequest
from tornado.web import HTTPError

from ..brokers import BrokerUnavailableError
from ..cors import CorsPolicy
from ..grant import Grant
from .jwt import InvalidToken, JWTVerifier, TokenKeysUnavailable
from .tickets import MAX_TICKET_TTL, TicketStore, decode_grant, encode_grant, ticket_key

__all__ = ["StreamAuth"]


class StreamAuth:
    """Tickets and JWTs for event streams, for ``authorize()`` to return.

    ``jwt``: the verifier of tokens (``None``: tokens are not accepted).
    ``tickets``: where tickets are kept (``None``: tickets are not accepted;
    :func:`~sse_handler.auth.tickets.tickets_for` gives the store for a
    broker). ``bearer``, ``cookie``, ``query``: where a token may come from
    (the header; a cookie's name; a query parameter's name, off by default).
    ``ticket_param``: the ticket's query parameter. ``ticket_ttl``: a
    ticket's default lifetime (s). ``expire_streams``: end a stream when its
    credential expires (the default; ``False`` lets streams outlive it).
    """

    def __init__(
        self,
        *,
        jwt: JWTVerifier | None = None,
        tickets: TicketStore | None = None,
        bearer: bool = True,
        cookie: str | None = None,
        query: str | None = None,
        ticket_param: str = "ticket",
        ticket_ttl: float = 30.0,
        expire_streams: bool = True,
    ) -> None:
        _check_ttl(ticket_ttl)
        self.jwt = jwt
        self.tickets = tickets
        self.bearer = bearer
        self.cookie = cookie
        self.query = query
        self.ticket_param = ticket_param
        self.ticket_ttl = ticket_ttl
        self.expire_streams = expire_streams

    # ----------------------------------------------------------------- tickets

    async def issue_ticket(
        self,
        subject: str | None,
        channels: Iterable[str],
        *,
        ttl: float | None = None,
        publish: Iterable[str] = (),
        expires_at: float | None = None,
    ) -> str:
        """A new ticket for ``subject`` and ``channels`` (patterns), valid once
        for ``ttl`` seconds (default ``ticket_ttl``, at most 300).

        ``expires_at`` (epoch seconds) is when the stream opened with it ends:
        the expiry of the credential the ticket was issued against.
        """
        if self.tickets is None:
            raise RuntimeError("this StreamAuth has no ticket store (tickets=...)")
        ttl = self.ticket_ttl if ttl is None else ttl
        _check_ttl(ttl)
        grant = Grant(list(channels), subject=subject, publish=publish, expires_at=expires_at)
        ticket = secrets.token_urlsafe(32)
        await self.tickets.put(ticket_key(ticket), encode_grant(grant), ttl)
        return ticket

    async def redeem_ticket(self, ticket: str, *, spend: bool = True) -> Grant:
        """What ``ticket`` grants, spending it; ``HTTPError(401)`` if it grants
        nothing, ``HTTPError(503)`` if the ticket store cannot be reached.

        With ``spend=False`` (a ``HEAD``, which opens no stream) the ticket
        stays valid, where the store can read one without taking it (both
        stores here can; a store without ``peek`` answers 401).
        """
        if self.tickets is None or not ticket or len(ticket) > 256:
            raise HTTPError(401, reason="Invalid ticket")
        read = self.tickets.take if spend else getattr(self.tickets, "peek", None)
        if read is None:
            raise HTTPError(401, reason="Invalid ticket")
        try:
            value = await read(ticket_key(ticket))
        except BrokerUnavailableError:
            raise HTTPError(503, reason="Ticket store unavailable") from None
        if value is None:
            raise HTTPError(401, reason="Invalid ticket")
        return self._expiring(decode_grant(value))

    # ------------------------------------------------------------------ tokens

    async def authorize(self, request: HTTPServerRequest, cors: CorsPolicy | None = None) -> Grant:
        """The grant of the request's ticket, else of its token (see the module).

        ``cors``: the handler's policy (``self.cors``), whose origins may send
        cookies besides the stream's own.
        """
        ticket = _last(request, self.ticket_param)
        if ticket is not None:
            # A HEAD opens no stream: it must not use up the one a ticket is for.
            return await self.redeem_ticket(ticket, spend=request.method != "HEAD")
        return await self.authenticate(request, cors)

    async def authenticate(
        self, request: HTTPServerRequest, cors: CorsPolicy | None = None
    ) -> Grant:
        """The grant of the request's token (no tickets): for the endpoints
        that issue tickets or publish. 401 without a valid token; 403 for a
        cookie sent from another site; 503 when the JWKS cannot be read."""
        found = self.token(request)
        if found is None or self.jwt is None:
            raise HTTPError(401, reason="Credentials required")
        token, source = found
        if source == "cookie" and not same_site(request, cors):
            raise HTTPError(403, reason="Cookie sent from another origin")
        try:
            grant = await self.jwt.verify(token)
        except InvalidToken:
            raise HTTPError(401, reason="Invalid token") from None
        except TokenKeysUnavailable:
            raise HTTPError(503, reason="Token keys unavailable") from None
        return self._expiring(grant)

    def token(self, request: HTTPServerRequest) -> tuple[str, str] | None:
        """The request's token and where it was (``bearer``, ``cookie``, ``query``)."""
        if self.bearer:
            scheme, _, value = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                return value.strip(), "bearer"
        if self.cookie is not None:
            try:
                morsel = request.cookies.get(self.cookie)
            except Exception:  # http.cookies refuses some malformed headers
                morsel = None
            if morsel is not None and morsel.value:
                return morsel.value, "cookie"
        if self.query is not None:
            in_query = _last(request, self.query)
            if in_query:
                return in_query, "query"
        return None

    def _expiring(self, grant: Grant) -> Grant:
        if self.expire_streams or grant.expires_at is None:
            return grant
        return Grant(grant.read, subject=grant.subject, publish=grant.publish)


def same_site(request: HTTPServerRequest, cors: CorsPolicy | None) -> bool:
    """May this request's cookies act for the user? True for the stream's own
    origin, an origin listed (exactly) in ``cors``, or a request with no sign
    of coming from another site (no ``Origin``: a same-origin GET, or not a
    browser)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return request.headers.get("Sec-Fetch-Site") not in ("cross-site", "same-site")
    if origin == f"{request.protocol}://{request.host}":
        return True
    return cors is not None and origin != "*" and origin in cors.origins


def _last(request: HTTPServerRequest, name: str) -> str | None:
    values = request.query_arguments.get(name)
    if not values:
        return None
    try:
        return values[-1].decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(400, reason=f"Invalid unicode in {name}") from None


def _check_ttl(ttl: float) -> None:
    if not 0 < ttl <= MAX_TICKET_TTL:
        raise ValueError(f"a ticket's ttl must be above 0 and at most {MAX_TICKET_TTL:g} s")
