"""Serve a registered model over HTTP with limits: MLflow's scoring app behind a guard.

Run: python -m ops.serving models:/image-classifier@champion [--host 127.0.0.1] [--port 5001]

Not a pipeline stage: a command for using the model. The app is MLflow's own (`mlflow models
serve` runs the same one: `/ping`, `/health`, `/version`, `/invocations`), so requests and answers
are the same. MLflow's server reads any body whole and parses any of its formats, which lets a
small request cost gigabytes (thousands of tiny pictures, a compressed parquet table). The guard in
front refuses, before reading or parsing a body:

- any content type but JSON (415): parquet and CSV carry no pictures the model would take;
- a body over MAX_BODY bytes (413), whether or not it says its length;
- a body that has not arrived READ_SECONDS after its headers (408, and the connection is closed):
  a body is read whole before the request waits for a work slot, so slow or stalled clients hold
  no slot, and the bodies held at once are bounded (HELD_BYTES, 503 beyond);
- a body with more brackets (deep) or more commas and colons (wide) than a request of MAX_ROWS
  pictures holds (400): either would make the parser build gigabytes from megabytes; a number of
  more than MAX_DIGITS digits (400): the parser refuses those of thousands with an error (500);
- a request beyond SLOTS being served and WAITING queued (503: try again later).

A connection whose next request's headers do not arrive within READ_SECONDS is closed (`Protocol`).
The model refuses the rest (serving.check_limits: rows, bytes, pixels per picture and request) with
400 before it decodes a picture, decodes one request at a time, and gives up a request past the
scoring server's timeout (pyfunc.ImageClassifier.predict) rather than work on after its 504.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from ops.serving import pyfunc

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The largest body: MAX_REQUEST_BYTES of pictures, base64-encoded (4/3), and the JSON around them.
MAX_BODY = pyfunc.MAX_REQUEST_BYTES * 4 // 3 + 2**20
#: The most `[` and `{` a request may hold: a dataframe_records or dataframe_split of MAX_ROWS rows
#: has a few per row (base64 has none), so more is no request for this model.
MAX_BRACKETS = 2 * pyfunc.MAX_ROWS + 16
#: The most `,` and `:` a request may hold: such a request has a few per row (base64 has none), so
#: more is a wide JSON (a row of millions of keys, a flat list of millions of numbers).
MAX_ITEMS = 4 * pyfunc.MAX_ROWS + 32
#: The most digits of a number in a request (its `index` holds numbers below MAX_ROWS): a number of
#: thousands is more than Python's JSON parser reads (a 500 from MLflow).
MAX_DIGITS = 32
LONG_NUMBER = re.compile(rb"(?:^|[\[,:\s-])\d{%d}" % (MAX_DIGITS + 1))  # base64 has none of [ , : - or spaces
#: Seconds a request's headers, and then its body, may take to arrive.
READ_SECONDS = 30.0
#: The bytes of the bodies held at once, being read, waiting or served.
HELD_BYTES = 2 * MAX_BODY
#: Requests served at once, and requests waiting for one of those slots; beyond both, 503.
SLOTS = 2
WAITING = 8


def _answer(status: int, code: str, message: str) -> tuple[int, bytes]:
    return status, json.dumps({"error_code": code, "message": message}).encode()


BUSY = _answer(503, "TEMPORARILY_UNAVAILABLE", "the model is busy: try again in a moment")


async def _send(send: Send, status: int, body: bytes, close: bool = False) -> None:
    headers = [(b"content-type", b"application/json")] + ([(b"connection", b"close")] if close else [])
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, which closes a connection whose next request's headers have not
    arrived `read_seconds` after it opened or after its last answer (a client sending them a byte at
    a time, or nothing, would hold the connection forever)."""

    read_seconds = READ_SECONDS

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_headers()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._await_headers()

    def _await_headers(self) -> None:
        if not self.transport.is_closing():
            self.loop.call_later(self.read_seconds, self._close_unless_asked, self.cycle)

    def _close_unless_asked(self, cycle: object) -> None:
        if self.cycle is cycle and not self.transport.is_closing():  # no request since
            self.transport.close()


class Guard:
    """An ASGI app that lets through to `app` only requests within the limits of this module."""

    def __init__(
        self,
        app: App,
        max_body: int = MAX_BODY,
        slots: int = SLOTS,
        waiting: int = WAITING,
        read_seconds: float = READ_SECONDS,
        held_bytes: int = HELD_BYTES,
    ) -> None:
        self.app, self.max_body, self.slots_count, self.waiting_limit = app, max_body, slots, waiting
        self.read_seconds, self.held_limit = read_seconds, held_bytes
        self.waiting = self.held = 0
        self.slots: asyncio.Semaphore | None = None  # made in the server's event loop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != "/invocations":
            await self.app(scope, receive, send)
            return
        refused = self._refuse_by_headers(dict(scope.get("headers") or []))
        if refused is not None:
            await _send(send, *refused)
            return
        held = [0]
        try:
            body = await self._read(receive, held)
            if isinstance(body, tuple):  # the body was refused before it was whole: close the connection
                await _send(send, *body, close=True)
            elif body is not None:
                await self._serve(scope, receive, send, body)
        finally:
            self.held -= held[0]

    def _refuse_by_headers(self, headers: dict[bytes, bytes]) -> tuple[int, bytes] | None:
        kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if kind != b"application/json":
            shown = kind.decode(errors="replace") or "none"
            return _answer(415, "INVALID_PARAMETER_VALUE", f"content type {shown!r}: send JSON. {pyfunc.WHAT_TO_SEND}")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return self._too_large()
        return None

    def _too_large(self) -> tuple[int, bytes]:
        return _answer(
            413,
            "INVALID_PARAMETER_VALUE",
            f"the request is over {self.max_body} bytes: send at most {pyfunc.MAX_ROWS} pictures of "
            f"{pyfunc.MAX_REQUEST_BYTES} bytes together in one request",
        )

    async def _read(self, receive: Receive, held: list[int]) -> bytes | tuple[int, bytes] | None:
        """The whole body; an answer refusing it (413, 408, 503); None when the client went away.
        `held[0]` counts its bytes in `self.held` as they arrive."""
        chunks = []
        try:
            async with asyncio.timeout(self.read_seconds):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    chunks.append(message.get("body", b""))
                    held[0] += len(chunks[-1])
                    self.held += len(chunks[-1])
                    if held[0] > self.max_body:  # a body that did not say its length, or said less
                        return self._too_large()
                    if self.held > self.held_limit:
                        return BUSY
                    if not message.get("more_body"):
                        return b"".join(chunks)
        except TimeoutError:
            return _answer(
                408,
                "REQUEST_TIMEOUT",
                f"the request's body did not arrive within {self.read_seconds:g} s: send it whole, at once",
            )

    async def _serve(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        refused = _refuse_by_shape(body)
        if refused is not None:
            await _send(send, *refused)
            return
        if self.slots is None:
            self.slots = asyncio.Semaphore(self.slots_count)
        if self.slots.locked() and self.waiting >= self.waiting_limit:
            await _send(send, *BUSY)
            return
        self.waiting += 1
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        try:
            await self.app(scope, replay, send)
        finally:
            self.slots.release()


def _refuse_by_shape(body: bytes) -> tuple[int, bytes] | None:
    """400 for a JSON body deeper or wider than a request of at most MAX_ROWS pictures, or holding a
    number of more than MAX_DIGITS digits."""
    if body.count(b"[") + body.count(b"{") > MAX_BRACKETS:
        problem = f"nests or lists more than a request of at most {pyfunc.MAX_ROWS} pictures does"
    elif body.count(b",") + body.count(b":") > MAX_ITEMS:
        problem = f"holds more values than a request of at most {pyfunc.MAX_ROWS} pictures does"
    elif LONG_NUMBER.search(body):
        problem = f"holds a number of more than {MAX_DIGITS} digits, which no request for this model has"
    else:
        return None
    return _answer(400, "INVALID_PARAMETER_VALUE", f"the request {problem}. {pyfunc.WHAT_TO_SEND}")


def app(model_uri: str, read_seconds: float = READ_SECONDS) -> Guard:
    """MLflow's scoring app for the model at `model_uri`, behind the guard."""
    from mlflow.pyfunc import scoring_server

    return Guard(
        scoring_server.init(scoring_server.load_model_with_mlflow_config(model_uri)), read_seconds=read_seconds
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="the model's URI: models:/image-classifier@champion, runs:/<id>/finetuned, ...")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every network)")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument(
        "--read-timeout",
        type=float,
        default=READ_SECONDS,
        metavar="SECONDS",
        help=f"seconds a request's headers, then its body, may take to arrive (default {READ_SECONDS:g})",
    )
    args = parser.parse_args()
    if not args.read_timeout > 0:
        parser.error(
            f"--read-timeout {args.read_timeout:g}: give a number of seconds above 0, such as {READ_SECONDS:g}"
        )
    import uvicorn

    from ops.tracking import locations, store

    path = store.sqlite_path(store.tracking_uri())
    if path is not None and path.is_file():  # a models:/ or runs:/ URI resolves through it
        try:
            locations.own_store(path)
        except locations.ForeignStore as err:
            parser.exit(2, f"error: {err}\n")
    sys.dont_write_bytecode = True  # the model's code is imported from its folder: leave no __pycache__ there
    guarded = app(args.model, args.read_timeout)
    log.info("serving %s on http://%s:%d", args.model, args.host, args.port)
    protocol = type("Protocol", (Protocol,), {"read_seconds": args.read_timeout})
    uvicorn.run(guarded, host=args.host, port=args.port, log_level="warning", http=protocol)
