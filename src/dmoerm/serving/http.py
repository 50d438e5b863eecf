"""The reward server's HTTP layer: uvicorn settings and a deadline on each request's headers and body.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) but sets no limit on a client that has
started a request: one that sends half its headers, or a Content-Length and then a trickle of body bytes, holds
its connection (and a file descriptor, and for the body an ASGI task) forever (issue 14: "slow clients that
never finish their headers or body are held forever"). :class:`DeadlineH11Protocol` is uvicorn's own h11
protocol plus one timer: from a connection's first moment, or from the first byte of each later request, the
client has ``request_timeout_s`` to deliver the whole request (request line, headers and body); a client
still sending then is answered 408 (when no response has started) and disconnected. The timer is off while
the request is being scored, so a slow batch never trips it.

Nothing here runs at import time beyond defining classes; uvicorn is imported by the server only.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)

__all__ = ["DeadlineH11Protocol", "deadline_protocol", "uvicorn_config"]


def _timeout_response(timeout_s: float) -> bytes:
    body = json.dumps(
        {
            "error": {
                "code": "request_timeout",
                "message": f"the request was not received completely within {timeout_s:g} s",
            }
        }
    ).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for receiving each request (see the module docstring)."""

    request_timeout_s: float = 60.0
    """Seconds a client has to send one whole request; set per server by :func:`deadline_protocol`."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()  # a client that connects and sends nothing is held no longer than one that sends slowly

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # h11 waits for the request line and headers in IDLE and for the body in SEND_BODY: the client owes
        # us bytes. DONE (or a closed/errored connection): the request is in; the timer has no business.
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            self._arm()
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        # Between requests uvicorn's keep-alive timer takes over; the next request's first byte re-arms ours.
        if self.conn.their_state is not h11.SEND_BODY:
            self._disarm()
        super().on_response_complete()

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.request_timeout_s, self._on_deadline)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _on_deadline(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            return
        cycle = self.cycle
        in_flight = cycle is not None and not cycle.response_complete
        if not (in_flight and cycle.response_started):
            self.transport.write(_timeout_response(self.request_timeout_s))
        logger.info(
            "closing a connection from %s: request not received within %g s",
            f"{self.client[0]}:{self.client[1]}" if self.client else "?",
            self.request_timeout_s,
        )
        self.transport.close()


def deadline_protocol(request_timeout_s: float) -> type[DeadlineH11Protocol]:
    """A :class:`DeadlineH11Protocol` subclass with this deadline (uvicorn builds one protocol per connection)."""
    return type(
        "DeadlineH11Protocol", (DeadlineH11Protocol,), {"request_timeout_s": float(request_timeout_s)}
    )


def uvicorn_config(app: Any, host: str, port: int, config: Any, **overrides: Any):
    """The ``uvicorn.Config`` the reward server runs with (also used by tests that start it in a thread).

    ``config`` is a :class:`dmoerm.serving.ServeConfig`: its ``request_timeout_s``, ``keep_alive_s`` and
    ``log_level`` are applied. ``overrides`` go to ``uvicorn.Config`` as they are.
    """
    import uvicorn

    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "http": deadline_protocol(config.request_timeout_s),
        "timeout_keep_alive": config.keep_alive_s,
        "log_level": config.log_level,
        "access_log": config.log_level in ("debug", "trace"),
        "lifespan": "on",
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)
