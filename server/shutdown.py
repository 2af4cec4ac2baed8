"""Graceful shutdown: what SIGTERM (or Ctrl-C) does to a running server.

    signal ----> hypercorn closes the listener (new connections are refused) and idle keep-alive
       |         connections; requests in flight go on
       |-------> up to --shutdown-timeout seconds later: every engine aborts what it still runs, so
       |         streams end with a last chunk (finish_reason "abort") and `data: [DONE]`, JSON answers
       |         come back with finish_reason "abort", responses as "incomplete" ("interrupted")
       |-------> hypercorn waits ABORT_MARGIN more seconds for those last bytes, then the lifespan ends:
                 fine-tuning workers are stopped and their jobs failed (code server_shutdown), engines
                 stop, SQLite closes (every write is a committed transaction, so nothing is torn)

A second signal skips the rest of the wait: in-flight generations are aborted at once.
"""

from __future__ import annotations

import asyncio
import logging

from server.registry import ModelRegistry

log = logging.getLogger(__name__)

ABORT_MARGIN = 3.0  # seconds for aborted streams to send their last chunk before hypercorn cancels them


class GracefulShutdown:
    """Ends in-flight generations once the grace period is over (the first signal starts it)."""

    def __init__(self, registry: ModelRegistry, timeout: float) -> None:
        self.registry = registry
        self.timeout = timeout
        self.started = False
        self._deadline: asyncio.TimerHandle | None = None

    @property
    def connection_grace(self) -> float:
        """How long the HTTP server waits for open connections (hypercorn's graceful_timeout)."""
        return self.timeout + ABORT_MARGIN

    def signal(self, loop: asyncio.AbstractEventLoop) -> None:
        """The first call starts the grace period; a later one ends it at once."""
        if self.started:
            log.warning("second signal: aborting in-flight generations now")
            self.abort_in_flight()
            return
        self.started = True
        log.info("shutting down: refusing new connections; in-flight requests have %gs to finish", self.timeout)
        self._deadline = loop.call_later(self.timeout, self.abort_in_flight)

    def abort_in_flight(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        for served in self.registry.list():
            if served.engine is not None:
                served.engine.abort_all()
