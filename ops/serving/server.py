"""Serve a registered model over HTTP with limits: MLflow's scoring app behind a guard.

Run: python -m ops.serving models:/image-classifier@champion [--host 127.0.0.1] [--port 5001]

Not a pipeline stage: a command for using the model. The app is MLflow's own (`mlflow models
serve` runs the same one: `/ping`, `/health`, `/version`, `/invocations`), so requests and answers
are the same. MLflow's server reads any body whole and parses any of its formats, which lets a
small request cost gigabytes (thousands of tiny pictures, a compressed parquet table). The guard in
front refuses, before reading or parsing a body:

- a body over MAX_BODY bytes (413), whether or not it says its length;
- any content type but JSON (415): parquet and CSV carry no pictures the model would take;
- a body with more brackets than a request of MAX_ROWS pictures holds (400): a deeply nested JSON
  would exhaust the parser;
- a request beyond SLOTS being served and WAITING queued (503: try again later).

The model refuses the rest (serving.check_limits: rows, bytes, pixels per picture and request) with
400 before it decodes a picture, and decodes one request at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

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
#: Requests served at once, and requests waiting for one of those slots; beyond both, 503.
SLOTS = 2
WAITING = 8


def _answer(status: int, code: str, message: str) -> tuple[int, bytes]:
    return status, json.dumps({"error_code": code, "message": message}).encode()


async def _send(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """An ASGI app that lets through to `app` only requests within the limits of this module."""

    def __init__(self, app: App, max_body: int = MAX_BODY, slots: int = SLOTS, waiting: int = WAITING) -> None:
        self.app, self.max_body, self.slots_count, self.waiting_limit = app, max_body, slots, waiting
        self.waiting = 0
        self.slots: asyncio.Semaphore | None = None  # made in the server's event loop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != "/invocations":
            await self.app(scope, receive, send)
            return
        refused = self._refuse_by_headers(dict(scope.get("headers") or []))
        if refused is not None:
            await _send(send, *refused)
            return
        if self.slots is None:
            self.slots = asyncio.Semaphore(self.slots_count)
        if self.slots.locked() and self.waiting >= self.waiting_limit:
            await _send(send, *_answer(503, "TEMPORARILY_UNAVAILABLE", "the model is busy: try again in a moment"))
            return
        self.waiting += 1
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
        try:
            await self._serve(scope, receive, send)
        finally:
            self.slots.release()

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

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:  # a body that did not say its length, or said less
                await _send(send, *self._too_large())
                return
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        if body.count(b"[") + body.count(b"{") > MAX_BRACKETS:
            await _send(
                send,
                *_answer(
                    400,
                    "INVALID_PARAMETER_VALUE",
                    f"the request nests or lists more than a request of at most {pyfunc.MAX_ROWS} pictures does. "
                    + pyfunc.WHAT_TO_SEND,
                ),
            )
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def app(model_uri: str) -> Guard:
    """MLflow's scoring app for the model at `model_uri`, behind the guard."""
    from mlflow.pyfunc import scoring_server

    return Guard(scoring_server.init(scoring_server.load_model_with_mlflow_config(model_uri)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="the model's URI: models:/image-classifier@champion, runs:/<id>/finetuned, ...")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every network)")
    parser.add_argument("--port", type=int, default=5001)
    args = parser.parse_args()
    import uvicorn

    guarded = app(args.model)
    log.info("serving %s on http://%s:%d", args.model, args.host, args.port)
    uvicorn.run(guarded, host=args.host, port=args.port, log_level="warning")
