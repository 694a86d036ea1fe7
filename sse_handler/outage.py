"""How a handler tells its log that the broker is away: once, not per stream.

While Redis is down every stream that arrives is turned away with a retry
hint, and browsers come back every few seconds: a line (let alone a traceback)
per stream would bury the log. :class:`BrokerOutage` logs one WARNING when the
broker goes away, a summary at most every ``summary_every`` seconds while it
stays away, and one line when it is back.
"""

from __future__ import annotations

import logging
import time

__all__ = ["BrokerOutage"]

log = logging.getLogger("sse_handler")


class BrokerOutage:
    #: Seconds between two summaries while the broker stays away.
    summary_every = 60.0

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._since: float | None = None
        self._turned_away = 0
        self._summary_at = 0.0

    @property
    def down(self) -> bool:
        return self._since is not None

    def failed(self, what: str, exc: BaseException) -> None:
        """A stream was turned away because ``what`` (subscribing, a replay) failed."""
        now = time.monotonic()
        self._turned_away += 1
        if self._since is None:
            self._since = self._summary_at = now
            log.warning(
                "%s: the broker is unavailable (%s failed: %s); streams are turned away "
                "with a retry hint until it is back",
                self.endpoint,
                what,
                exc,
            )
        elif now - self._summary_at >= self.summary_every:
            self._summary_at = now
            log.warning(
                "%s: the broker is still unavailable after %.0f s; %d streams turned away "
                "so far (last error: %s)",
                self.endpoint,
                now - self._since,
                self._turned_away,
                exc,
            )

    def succeeded(self) -> None:
        """The broker answered again."""
        if self._since is None:
            return
        log.warning(
            "%s: the broker is back after %.0f s; %d streams were turned away meanwhile",
            self.endpoint,
            time.monotonic() - self._since,
            self._turned_away,
        )
        self._since = None
        self._turned_away = 0
