"""CORS for event streams: an explicit allow-list, never ``*`` with credentials.

``EventSource`` opened on another origin sends ``Origin`` (and, with
``withCredentials: true``, cookies); on a reconnect it also sends
``Last-Event-ID``, which is not a CORS-safelisted header, so a browser may
preflight it with ``OPTIONS``. The handler answers both from one allow-list.
"""

from __future__ import annotations

from collections.abc import Collection

__all__ = ["CorsPolicy"]


class CorsPolicy:
    """Which origins may read a stream, and whether with credentials."""

    def __init__(self, origins: Collection[str], credentials: bool = False) -> None:
        self.origins = frozenset(origins)
        self.credentials = credentials
        if credentials and "*" in self.origins:
            raise ValueError(
                "cors_origins: '*' cannot be combined with credentials; list the origins"
            )
        for origin in self.origins:
            if any(c in origin for c in "\r\n\0,"):
                raise ValueError(f"cors_origins: {origin!r} is not an origin")

    @property
    def enabled(self) -> bool:
        """True when any origin is allowed."""
        return bool(self.origins)

    def allows(self, origin: str | None) -> bool:
        """Is ``origin`` on the allow-list?"""
        return origin is not None and ("*" in self.origins or origin in self.origins)

    def headers(self, origin: str | None) -> dict[str, str]:
        """Response headers for a request from ``origin`` (none if not allowed)."""
        if not self.enabled:
            return {}
        # The answer depends on Origin, so caches must key on it.
        headers = {"Vary": "Origin"}
        if not self.allows(origin):
            return headers
        assert origin is not None
        if "*" in self.origins:
            headers["Access-Control-Allow-Origin"] = "*"
        else:
            headers["Access-Control-Allow-Origin"] = origin
        if self.credentials:
            headers["Access-Control-Allow-Credentials"] = "true"
        return headers

    def preflight_headers(self, origin: str | None) -> dict[str, str]:
        """Headers answering an ``OPTIONS`` preflight from ``origin``."""
        headers = self.headers(origin)
        if "Access-Control-Allow-Origin" in headers:
            headers["Access-Control-Allow-Methods"] = "GET"
            headers["Access-Control-Allow-Headers"] = "Last-Event-ID, Cache-Control"
            headers["Access-Control-Max-Age"] = "600"
        return headers
