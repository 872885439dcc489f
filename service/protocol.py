"""uvicorn's HTTP protocol with the timeouts and limits a public server needs.

uvicorn times out idle keep-alive connections but not a client that trickles its request
headers (one byte a second holds a connection, and a worker, forever), and any byte resets its
keep-alive timer, even the blank lines a client may send between requests (which begin no
request). :class:`TimedHttpProtocol` closes a connection whose headers are not complete within
``header_timeout_s`` of its first byte (or of the connection opening), and an idle keep-alive
connection uvicorn's keep-alive timeout after its last response unless a new request begins, so
that neither a trickle of header bytes nor one of blank lines holds a connection open. The body's
own deadline is :class:`service.app.BodyLimit`'s.

uvicorn's httptools protocol buffers request headers without limit (500 MB of them were read
into memory, and answered): :class:`TimedHttpProtocol` answers a request whose head (request
line and headers) passes ``max_header_bytes`` with a JSON 431 and closes the connection, having
held at most that much of it (and one read of the socket, 256 KiB, past it). Nor does uvicorn
bound how long a response may wait for a client that reads none of it (each such connection held
its response, 7.4 MB, indefinitely): a connection whose unsent response has not shrunk for
``send_timeout_s`` is dropped. Bytes that are not HTTP/1.1 get a JSON 400 (uvicorn's is plain
text), as every other error. A 400 or 431 comes after the responses to the requests pipelined
before it on the connection (uvicorn wrote its 400 at once and closed the connection under
them).

This module imports neither torch nor the app: a worker process of ``mcdrop serve --workers N``
unpickles its uvicorn configuration, this protocol with it, before it starts the thread that
answers the supervisor's health check, and the supervisor kills a worker silent for 5 s.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["TimedHttpProtocol"]

#: How long a connection refused with a 431 stays open for the client to read the answer.
_LINGER_S = 1.0


class TimedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on each request's headers, and one on an
    idle keep-alive connection that only the start of a new request lifts."""

    def __init__(
        self,
        *args: Any,
        header_timeout_s: float,
        max_header_bytes: int = 64 * 1024,
        send_timeout_s: float = 30.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.header_timer: asyncio.TimerHandle | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.max_header_bytes = max_header_bytes
        #: Bytes of the request head received so far; None between a request's headers and the
        #: next request's first byte.
        self.header_bytes: int | None = 0
        self.heads = 0  # requests whose headers are complete, on this connection
        # a 400 or 431 is sent (or waits to be): what the client still sends is read and dropped
        self.refused = False
        #: A refusal waiting for the responses of the requests pipelined before it.
        self.last_answer: tuple[bytes, bool] | None = None
        self.send_timeout_s = send_timeout_s
        self.send_timer: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        if self.header_timer is None:
            self.header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _headers_late(self) -> None:
        self.header_timer = None
        if not self.transport.is_closing():
            self.logger.info("closing a connection whose request headers came too slowly")
            self.transport.close()

    def _idle_too_long(self) -> None:
        self.idle_timer = None
        if not self.transport.is_closing():
            self.logger.info("closing a keep-alive connection that began no new request")
            self.transport.close()

    def _wake(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    # uvicorn's signature, which narrows asyncio.Protocol's BaseTransport to a Transport (and
    # ignores the same override error).
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # a connection that never sends a byte is cut too

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        if self.header_bytes is None:  # a body, or a request's first bytes after a response
            super().data_received(data)
            return
        room = self.max_header_bytes - self.header_bytes
        if len(data) <= room:
            self.header_bytes += len(data)
            super().data_received(data)
            return
        # The headers must end within ``room`` bytes: the rest may be the body.
        heads = self.heads
        if room:
            super().data_received(data[:room])
        if self.transport.is_closing():
            return
        if self.heads == heads:
            self._header_too_large()
            return
        super().data_received(data[room:])

    def _header_too_large(self) -> None:
        self.logger.info("refusing a request whose headers exceed %d bytes", self.max_header_bytes)
        self.refused = True
        self._disarm()
        # Closed once the client has had time to read the answer: closing while its headers
        # still arrive would reset the connection, and the answer with it.
        self._refuse(
            b"431 Request Header Fields Too Large",
            f"the request line and headers are larger than the limit of {self.max_header_bytes} "
            "bytes (max_header_bytes); send fewer or shorter headers",
            linger=True,
        )

    def _refuse(self, status: bytes, message: str, linger: bool) -> None:
        """Answer ``status`` (``b"431 Reason"``) with the JSON error ``message`` (the v2 shape
        under ``/v2``), the connection's last response (:meth:`_answer_last`)."""
        from service import errors  # (imports torch, through mcdrop: see the module docstring)

        path = self.url.split(b"?", 1)[0].decode("latin-1") if self.url else ""
        code = int(status.split(b" ", 1)[0])
        response = errors.error_response(code, errors.ErrorCode.HTTP_ERROR, message, path=path)
        head = [b"HTTP/1.1 %s\r\n" % status]
        # uvicorn's own headers first (date, server), as on every response it sends
        every = [*self.server_state.default_headers, *response.raw_headers]
        head += [b"%s: %s\r\n" % (k, v) for k, v in every]
        self._answer_last(
            b"".join([*head, b"connection: close\r\n\r\n", response.body]), linger=linger
        )

    def _answer_last(self, answer: bytes, linger: bool) -> None:
        """Write ``answer``, the connection's last response, and close it (``linger``: after
        :data:`_LINGER_S`, the write side ended now); but after the responses to the requests
        before it on the connection where any is still being answered (pipelined: HTTP/1.1
        answers in order, RFC 9112 section 9.3.2, and uvicorn would close under them)."""
        self.refused = True  # what the client sends after it is read and dropped
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not cycle.more_body:
            self.last_answer = (answer, linger)  # on_response_complete writes it
            return
        self.transport.write(answer)
        if linger:
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(_LINGER_S, self.transport.close)
        else:
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes that are not HTTP/1.1 (httptools could not parse them: a
        bad request line, a header without a colon, both Content-Length and Transfer-Encoding,
        a bad chunk), as every other error: JSON, saying what to fix (uvicorn's is plain text,
        ``msg``)."""
        self._disarm()
        # (a bad chunk of the body of the request being answered: this 400 is its answer, now)
        self._refuse(
            b"400 Bad Request",
            f"the request is not valid HTTP/1.1 ({msg.rstrip('.')}): check its request line, "
            "its headers (name: value, each on a line of its own ending in CRLF) and its body's "
            "framing (Content-Length or Transfer-Encoding: chunked, not both)",
            linger=False,
        )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._wake()
        self._arm()
        if self.header_bytes is None:
            self.header_bytes = 0

    def on_headers_complete(self) -> None:
        self._disarm()
        self._wake()  # a request pipelined before the last response ended: it runs now
        self.header_bytes = None
        self.heads += 1
        super().on_headers_complete()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._watch_send(self.transport.get_write_buffer_size())

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.send_timer is not None:
            self.send_timer.cancel()
            self.send_timer = None

    def _watch_send(self, unsent: int) -> None:
        """Drop the connection unless the client reads some of the ``unsent`` bytes within
        ``send_timeout_s`` (the write buffer, full now, has shrunk by then)."""
        self.send_timer = self.loop.call_later(self.send_timeout_s, self._send_stalled, unsent)

    def _send_stalled(self, unsent: int) -> None:
        self.send_timer = None
        if self.transport.is_closing() or not self.flow.write_paused:
            return
        now = self.transport.get_write_buffer_size()
        if now < unsent:  # the client reads, slowly
            self._watch_send(now)
            return
        self.logger.info(
            "dropping a connection whose client read nothing for %g s", self.send_timeout_s
        )
        self.transport.abort()  # frees the unsent response; the app sees a disconnect

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.last_answer is not None:  # a refusal that waited for the responses before it
            if self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                return  # (a pipelined request before it runs now)
            answer, linger = self.last_answer
            self.last_answer = None
            self._answer_last(answer, linger)
            return
        self._disarm()
        self._wake()
        self.header_bytes = None  # counted again from the next request's first byte
        # uvicorn armed its keep-alive timer (no pipelined request runs next), but any byte
        # cancels that one, blank lines too: ours only a new request's first byte does.
        if self.timeout_keep_alive_task is not None:
            self.idle_timer = self.loop.call_later(self.timeout_keep_alive, self._idle_too_long)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._wake()
        if self.send_timer is not None:
            self.send_timer.cancel()
            self.send_timer = None
        super().connection_lost(exc)
