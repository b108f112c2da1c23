"""The OpenAI-compatible HTTP endpoint of a resident worker: what its template serves (served.py),
for the invocations on this worker, so that `curl` in a `shell:` rule and code written against
the official `openai` client reach the resident model unchanged.

It listens on this node's loopback only, on a port of its own, and answers only requests that
carry the run's key (`Authorization: Bearer <key>`); every other request gets 401. It runs
tornado (Dask's HTTP library) on a thread and event loop of its own, so that requests never
delay the worker's heartbeats; the template's functions run in a pool of threads, where their
Batchers merge the requests of the invocations running side by side. Errors are OpenAI's JSON
errors, and each harms its request alone.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import re
import struct
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

import tornado.httpserver
import tornado.iostream
import tornado.netutil
import tornado.web

from ..api.batcher import BatcherClosed
from .served import Served

MAX_BODY_BYTES = 4 * 2**20  # a request body over this gets 413
READ_BODY_BYTES = 64 * 2**20  # one up to this is read (and dropped) first, so the client reads the 413
CALLERS = 64  # requests whose answers are awaited at once (threads of the pool)
START_TIMEOUT_S = 30.0
ROUTES = {"chat/completions": "chat", "completions": "completions", "embeddings": "embeddings"}


class ApiError(Exception):
    """An OpenAI-style error answer: status, message, type and code."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


class Endpoint:
    """One worker's endpoint. `served()` returns what the template's current state serves
    (waiting while it is built; raising once it is unavailable); `poisoned(error)` tells the
    worker that a served function raised what poisons the state."""

    def __init__(self, key: str, served: Callable[[], Served], poisoned: Callable[[BaseException], None]) -> None:
        self.key = key
        self.served = served
        self.poisoned = poisoned
        self.base_url = ""
        self._pool = ThreadPoolExecutor(CALLERS, thread_name_prefix="sticky-endpoint-call")
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._server: Optional[tornado.httpserver.HTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    def start(self) -> str:
        """Listen on a free loopback port; the base URL (`http://127.0.0.1:<port>/v1`)."""
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                port = self._listen()
            except BaseException as e:
                failure.append(e)
                started.set()
                return
            self.base_url = f"http://127.0.0.1:{port}/v1"
            started.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="sticky-endpoint", daemon=True)
        self._thread.start()
        if not started.wait(START_TIMEOUT_S):
            raise RuntimeError(f"the endpoint did not start within {START_TIMEOUT_S:g} s")
        if failure:
            raise failure[0]
        return self.base_url

    def _listen(self) -> int:
        app = tornado.web.Application(
            [(r"/v1/(.*)", Api, {"endpoint": self})], default_handler_class=Api, default_handler_args={"endpoint": self}
        )
        self._server = tornado.httpserver.HTTPServer(app, max_body_size=READ_BODY_BYTES, idle_connection_timeout=60)
        (sock,) = tornado.netutil.bind_sockets(0, address="127.0.0.1")
        self._server.add_sockets([sock])
        return sock.getsockname()[1]

    def stop(self) -> None:
        """Stop listening and end the endpoint's thread; requests waiting are answered 503 by
        their closed Batchers first (the state's teardown)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def close() -> None:
            if self._server is not None:
                self._server.stop()
                await self._server.close_all_connections()

        try:
            asyncio.run_coroutine_threadsafe(asyncio.wait_for(close(), 5), loop).result(10)
        except Exception:
            pass  # connections still open end with the process; the port is closed already
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._loop = None

    async def call(self, fn: Callable[[list[Any]], list[Any]], items: list[Any]) -> list[Any]:
        """The template's function on the items, in a thread of the pool (its Batcher merges them
        with other requests); its failures as API errors."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, fn, items)
        except BatcherClosed as e:
            raise ApiError(503, f"The model is not available: {e}.", "server_error", "unavailable") from e
        except Exception as e:
            self.poisoned(e)
            raise ApiError(500, f"The template's function failed: {type(e).__name__}: {e}", "server_error") from e


def too_large() -> ApiError:
    return ApiError(413, f"The request body is over {MAX_BODY_BYTES} bytes.", code="request_too_large")


def answer_of(value: Any) -> tuple[str, str]:
    """A served answer as (content, finish_reason)."""
    if isinstance(value, str):
        return value, "stop"
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"], str(value.get("finish_reason") or "stop")
    raise ApiError(
        500,
        f"The template's function returned {type(value).__name__}; an answer is a string or a dict with 'content'.",
        "server_error",
    )


def pieces(text: str) -> list[str]:
    """A text in the pieces a stream sends: words with the spaces after them."""
    return re.findall(r"\s*\S+\s*", text) or ([text] if text else [])


@tornado.web.stream_request_body
class Api(tornado.web.RequestHandler):
    """Every request: the key first, then the body's size, then the route."""

    def initialize(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._chunks: list[bytes] = []
        self._size = 0

    def check_xsrf_cookie(self) -> None:  # an API with a bearer key, not a browser form
        pass

    def prepare(self) -> None:
        given = self.request.headers.get("Authorization", "")
        expected = f"Bearer {self.endpoint.key}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            self.fail(
                ApiError(
                    401,
                    "Incorrect API key provided: this endpoint takes the run's key "
                    "(OPENAI_API_KEY in its invocations).",
                    "invalid_request_error",
                    "invalid_api_key",
                )
            )
            return
        length = self.request.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > READ_BODY_BYTES:
            self.fail(too_large())

    def data_received(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size <= MAX_BODY_BYTES and not self._finished:
            self._chunks.append(chunk)

    def fail(self, error: ApiError) -> None:
        if self._finished:
            return
        self.set_status(error.status)
        self.set_header("Content-Type", "application/json")
        self.finish({"error": {"message": error.message, "type": error.kind, "param": None, "code": error.code}})

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.finish({"error": {"message": self._reason, "type": "server_error", "param": None, "code": None}})

    async def get(self, path: str = "") -> None:
        await self.route("GET", path)

    async def post(self, path: str = "") -> None:
        await self.route("POST", path)

    async def route(self, method: str, path: str) -> None:
        try:
            served = await asyncio.get_running_loop().run_in_executor(self.endpoint._pool, self.endpoint.served)
            if method == "GET" and (path == "models" or path.startswith("models/")):
                self.models(served, path[len("models/") :] if "/" in path else None)
            elif method == "POST" and path in ROUTES:
                await self.serve(served, ROUTES[path])
            else:
                raise ApiError(404, f"Unknown endpoint: {method} {self.request.path}.", code="unknown_url")
        except ApiError as e:
            self.fail(e)
        except Exception as e:  # the state is unavailable (its setup failed, the worker retires)
            self.fail(ApiError(503, f"The model is not available: {e}", "server_error", "unavailable"))

    def models(self, served: Served, name: Optional[str]) -> None:
        card = {"id": served.model, "object": "model", "created": 0, "owned_by": "sticky"}
        if name is None:
            self.finish({"object": "list", "data": [card]})
        elif name == served.model:
            self.finish(card)
        else:
            raise ApiError(404, f"The model '{name}' does not exist.", code="model_not_found")

    def body(self) -> dict[str, Any]:
        if self._size > MAX_BODY_BYTES:
            raise too_large()
        try:
            body = json.loads(b"".join(self._chunks) or b"")
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"The body is not valid JSON: {e}.") from e
        if not isinstance(body, dict):
            raise ApiError(400, "The body must be a JSON object.")
        return body

    async def serve(self, served: Served, kind: str) -> None:
        body = self.body()
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "You must provide a model parameter.", code="missing_model")
        if model != served.model:
            raise ApiError(
                404,
                f"The model '{model}' does not exist; this endpoint serves '{served.model}'.",
                code="model_not_found",
            )
        fn = served.functions.get(kind)
        if fn is None:
            raise ApiError(
                501, f"The template does not serve {self.request.path}.", "invalid_request_error", "not_implemented"
            )
        if kind == "embeddings":
            await self.embeddings(served, fn, body)
            return
        items = requests_of(kind, body)
        answers = [answer_of(a) for a in await self.endpoint.call(fn, items)]
        if body.get("stream"):
            await self.stream(served, kind, answers, body)
        else:
            self.finish(completion(served.model, kind, answers))

    async def embeddings(self, served: Served, fn: Callable, body: dict[str, Any]) -> None:
        given = body.get("input")
        inputs = [given] if isinstance(given, str) else given
        if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
            raise ApiError(400, "'input' must be a string or a non-empty list of strings.", code="invalid_input")
        vectors = await self.endpoint.call(fn, inputs)
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, vector in enumerate(vectors):
            values = [float(v) for v in vector]
            packed = base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
            embedding: Any = packed if as_base64 else values
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        usage = {"prompt_tokens": 0, "total_tokens": 0}
        self.finish({"object": "list", "data": data, "model": served.model, "usage": usage})

    async def stream(self, served: Served, kind: str, answers: list[tuple[str, str]], body: dict) -> None:
        """Server-sent events as the official clients read them: a role chunk, the text in
        pieces, the finish reason, then `[DONE]`. A client that leaves ends its stream only."""
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        ident, created = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        chunks = []
        for index, (content, finish) in enumerate(answers):
            if kind == "chat":
                chunks.append(chunk(ident, created, served.model, kind, index, "", None, role=True))
            chunks += [chunk(ident, created, served.model, kind, index, p, None) for p in pieces(content)]
            chunks.append(chunk(ident, created, served.model, kind, index, "", finish))
        if (body.get("stream_options") or {}).get("include_usage"):
            last = chunk(ident, created, served.model, kind, 0, "", None)
            chunks.append({**last, "choices": [], "usage": usage_of()})
        try:
            for item in chunks:
                self.write(f"data: {json.dumps(item)}\n\n")
                await self.flush()
            self.write("data: [DONE]\n\n")
            await self.flush()
            self.finish()
        except tornado.iostream.StreamClosedError:
            pass  # the client left; its answers were made with the others' all the same


def requests_of(kind: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The requests a body makes of the template's function, one per answer."""
    n = body.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 128:
        raise ApiError(400, f"'n' must be an integer from 1 to 128, got {n!r}.", code="invalid_n")
    if kind == "chat":
        messages = body.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages)
        ):
            raise ApiError(
                400,
                "'messages' must be a non-empty list of objects with 'role' and 'content'.",
                code="invalid_messages",
            )
        return [body] * n
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ApiError(400, "'prompt' must be a string or a non-empty list of strings.", code="invalid_prompt")
    return [{**body, "prompt": p} for p in prompts for _ in range(n)]


def usage_of() -> dict[str, int]:
    """Token counts are the template's to know; the endpoint reports none."""
    return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def completion(model: str, kind: str, answers: list[tuple[str, str]]) -> dict[str, Any]:
    """A whole answer: a chat completion or a text completion."""
    created = int(time.time())
    if kind == "chat":
        choices = [
            {"index": i, "message": {"role": "assistant", "content": c}, "finish_reason": f, "logprobs": None}
            for i, (c, f) in enumerate(answers)
        ]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": usage_of(),
        }
    choices = [{"index": i, "text": c, "finish_reason": f, "logprobs": None} for i, (c, f) in enumerate(answers)]
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage_of(),
    }


def chunk(
    ident: str, created: int, model: str, kind: str, index: int, text: str, finish: Optional[str], role: bool = False
) -> dict[str, Any]:
    """One event of a stream."""
    if kind == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    choice = {"index": index, "text": text, "finish_reason": finish, "logprobs": None}
    return {"id": ident, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
