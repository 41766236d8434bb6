"""The server's HTTP connections: uvicorn's h11 protocol, with limits for clients that never finish.

uvicorn closes a connection that stays idle between requests (``timeout_keep_alive``),
but not one that sends a request's head a byte at a time, nor one that connects and says
nothing; and it answers a head too large for its buffer, or any other broken request,
with a plain-text 400. Here:

- a request's head must arrive within ``request_timeout_s`` of the connection opening or
  of the previous answer, else the connection gets a 408 and is closed (the body's own
  limit is the app's: :func:`qwenrt.serve.app._read_json`);
- beyond ``max_connections`` open connections, a new one gets a 503 and is closed;
- a broken request gets a 400, and a head over the limit a 431, in OpenAI's error shape
  like every other error of the server.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from qwenrt.serve.protocol import RequestError

STATUS_TEXT = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large",
               503: "Service Unavailable"}  # fmt: skip


class _Connection(h11.Connection):
    """h11's connection, remembering why it refused the client's bytes and telling when a request's head is in."""

    def __init__(self, our_role: Any, max_incomplete_event_size: int, on_request: Callable[[], None]) -> None:
        super().__init__(our_role, max_incomplete_event_size)
        self.refusal_status = 400
        self._on_request = on_request

    def next_event(self) -> Any:
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as exc:
            self.refusal_status = exc.error_status_hint  # 431 for a head over the size limit
            raise
        if isinstance(event, h11.Request):
            self._on_request()
        return event


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a time limit for a request's head and a cap on connections."""

    def __init__(self, *args: Any, request_timeout_s: float, max_connections: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _Connection(h11.SERVER, self.conn._max_incomplete_event_size, self._head_arrived)
        self._request_timeout_s = request_timeout_s
        self._max_connections = max_connections
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self._max_connections:
            self.logger.info("refused a connection: %d open, the limit is %d", len(self.connections) - 1,
                             self._max_connections)  # fmt: skip
            self._refuse(503, f"the server holds its limit of {self._max_connections} connections; try again")
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()  # the next request's head has the same time to arrive

    def send_400_response(self, msg: str) -> None:
        status = self.conn.refusal_status if self.conn.refusal_status in STATUS_TEXT else 400
        self.logger.info("refused a request: %d %s", status, STATUS_TEXT[status])
        reason = ("the request's headers are over this server's limit" if status == 431
                  else "the request is not valid HTTP")  # fmt: skip
        self._refuse(status, reason)

    def _head_arrived(self) -> None:
        self._disarm_head_timer()

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self._request_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being answered: its own limits apply
        self.logger.info("closed a connection: no request within %g s", self._request_timeout_s)
        self._refuse(408, f"no complete request within {self._request_timeout_s:g} s")

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` in OpenAI's error shape and close, whatever state h11 is in."""
        if self.transport.is_closing():
            return
        body = json.dumps(RequestError(message, status=status).body()).encode()
        head = (f"HTTP/1.1 {status} {STATUS_TEXT[status]}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()  # fmt: skip
        self.transport.write(head + body)
        self.transport.close()
