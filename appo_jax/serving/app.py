"""The Starlette ASGI app of `appo-jax serve`: OpenAI's chat / completions endpoints over a `BatchScheduler`.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``, ``GET /health`` (scheduler
status: ``slots``, ``busy_slots``, ``waiting``, ``errors``). A request becomes ``n`` `GenerationRequest`s (one per
choice) whose deltas come back from the scheduler thread through ``loop.call_soon_threadsafe`` onto an asyncio
queue. Streaming responses are server-sent events in OpenAI's chunk format ending with ``data: [DONE]``; when a
client disconnects, Starlette cancels the stream's generator and its ``finally`` cancels the requests (their
slots are freed at the next chunk boundary); a non-streamed request polls for a disconnect while it waits.

Errors: a refused request (`RequestError`, malformed JSON, unknown route) gets a 4xx
``{"error": {message, type, param, code}}``; a generation that fails in the scheduler gets a 500 body (or, once a
stream has started, an ``error`` event before ``[DONE]``).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from appo_jax.serving.openai_requests import (
    GenerationSpec,
    RequestError,
    ServedModel,
    parse_chat,
    parse_completion,
)
from appo_jax.serving.openai_responses import (
    Choice,
    ResponseFormat,
    TokenLogprobs,
    error_body,
    sse,
)
from appo_jax.serving.scheduler import BatchScheduler, Delta, GenerationRequest
from appo_jax.serving.tokenizer_access import SharedTokenizer

_DISCONNECT_POLL_S = 1.0


@dataclasses.dataclass
class _Server:
    scheduler: BatchScheduler
    tokenizer: SharedTokenizer
    model: ServedModel
    model_id: str
    started: int


class _Choices:
    """The ``n`` scheduler requests of one HTTP request and the asyncio queue of their ``(index, Delta)``."""

    def __init__(self, server: _Server, spec: GenerationSpec):
        self.scheduler = server.scheduler
        self.queue: asyncio.Queue[tuple[int, Delta]] = asyncio.Queue()
        self._pending: asyncio.Future | None = None
        loop = asyncio.get_running_loop()
        keys = server.scheduler.request_keys(spec.seed, spec.n)
        self.requests = [
            GenerationRequest(list(spec.prompt_ids), spec.max_tokens, spec.sampling, key,
                              self._sink(loop, i), spec.stop, spec.logprobs)
            for i, key in enumerate(keys)]

    def _sink(self, loop: asyncio.AbstractEventLoop, index: int):
        def put(delta: Delta) -> None:  # on the scheduler thread; raises once the loop is closed
            loop.call_soon_threadsafe(self.queue.put_nowait, (index, delta))
        return put

    def submit(self) -> None:
        try:
            for r in self.requests:
                self.scheduler.submit(r)
        except RuntimeError as err:
            raise RequestError(f"the server cannot take requests: {err}", status=503, type="server_error") from None

    def cancel(self) -> None:
        for r in self.requests:
            r.cancel()
        if self._pending is not None:
            self._pending.cancel()

    async def next(self, request: Request | None = None) -> tuple[int, Delta] | None:
        """The next delta; None when ``request``'s client has disconnected (polled while waiting). One
        ``queue.get`` task lives across the polls: cancelling a get on a timeout could lose a delta."""
        if request is None:
            return await self.queue.get()
        while True:
            if self._pending is None:
                self._pending = asyncio.ensure_future(self.queue.get())
            done, _ = await asyncio.wait({self._pending}, timeout=_DISCONNECT_POLL_S)
            if done:
                item, self._pending = self._pending.result(), None
                return item
            if await request.is_disconnected():
                return None


@dataclasses.dataclass
class _Accumulated:
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0


def _token_logprobs(server: _Server, ids: list[int], start: int, logprobs: list[float], chat: bool
                    ) -> TokenLogprobs:
    """Log-prob data of the tokens ``ids[start:]`` (``logprobs`` are theirs)."""
    new = ids[start:]
    offsets = [] if chat else server.tokenizer.text_offsets(ids, start)
    return TokenLogprobs(server.tokenizer.token_texts(new), server.tokenizer.token_bytes(new),
                         [float(x) for x in logprobs], offsets)


def _failure(delta: Delta) -> JSONResponse:
    kind = "server_error" if delta.error_status >= 500 else "invalid_request_error"
    return JSONResponse(error_body(delta.error, kind), status_code=delta.error_status)


async def _complete(server: _Server, request: Request, spec: GenerationSpec, fmt: ResponseFormat):
    """The non-streamed response: wait for every choice to finish."""
    choices = _Choices(server, spec)
    acc = [_Accumulated() for _ in range(spec.n)]
    try:
        choices.submit()
        done = 0
        while done < spec.n:
            item = await choices.next(request)
            if item is None:  # the client went away: nobody reads the answer
                return JSONResponse(error_body("client disconnected"), status_code=499)
            i, delta = item
            if delta.error is not None:
                return _failure(delta)
            a = acc[i]
            a.text += delta.text
            a.token_ids += delta.token_ids
            a.logprobs += delta.logprobs
            if delta.final:
                done += 1
                a.finish_reason, a.completion_tokens = delta.finish_reason, delta.completion_tokens
    finally:
        choices.cancel()
    out = [Choice(a.text, a.finish_reason, a.completion_tokens,
                  _token_logprobs(server, a.token_ids, 0, a.logprobs, fmt.chat) if spec.logprobs else None)
           for a in acc]
    return JSONResponse(fmt.response(out, len(spec.prompt_ids)))


async def _stream(server: _Server, spec: GenerationSpec, fmt: ResponseFormat) -> AsyncIterator[str]:
    """Server-sent events of every choice's deltas, then the usage chunk (if asked for) and ``[DONE]``."""
    choices = _Choices(server, spec)
    ids: list[list[int]] = [[] for _ in range(spec.n)]
    try:
        try:
            choices.submit()
        except RequestError as err:
            yield sse(error_body(err.message, err.type))
            yield sse("[DONE]")
            return
        if fmt.chat:
            for i in range(spec.n):
                yield sse(fmt.chunk(i, "", role=True))
        done, completion_tokens, failed = 0, 0, False
        while done < spec.n and not failed:
            i, delta = await choices.next()
            if delta.error is not None:
                yield sse(error_body(delta.error, "server_error" if delta.error_status >= 500 else
                                     "invalid_request_error"))
                failed = True
                continue
            start = len(ids[i])
            ids[i] += delta.token_ids
            lp = (_token_logprobs(server, ids[i], start, delta.logprobs, fmt.chat)
                  if spec.logprobs and delta.token_ids else None)
            if delta.text or lp is not None or delta.final:
                yield sse(fmt.chunk(i, delta.text, lp, delta.finish_reason))
            if delta.final:
                done += 1
                completion_tokens += delta.completion_tokens
        if spec.include_usage and not failed:
            yield sse(fmt.usage_chunk(len(spec.prompt_ids), completion_tokens))
        yield sse("[DONE]")
    finally:  # also when Starlette cancels the generator because the client disconnected
        choices.cancel()


async def _read_json(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(f"the request body is not valid JSON: {err}") from None


def _generation_endpoint(server: _Server, chat: bool):
    parse = parse_chat if chat else parse_completion

    async def endpoint(request: Request):
        spec = parse(await _read_json(request), server.model)
        fmt = ResponseFormat(chat, server.model.name, server.model_id)
        if spec.stream:
            return StreamingResponse(_stream(server, spec, fmt), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _complete(server, request, spec, fmt)

    return endpoint


def create_app(scheduler: BatchScheduler, tokenizer: SharedTokenizer, *, model_name: str, model_id: str,
               manage_scheduler: bool = True) -> Starlette:
    """The app serving ``scheduler`` under ``model_name``; ``model_id`` is every response's
    ``system_fingerprint``. With ``manage_scheduler`` the app's lifespan starts and stops the scheduler."""
    model = ServedModel(model_name, scheduler.context_len, scheduler.config.vocab_size, tokenizer.encode_chat,
                        tokenizer.encode_text)
    server = _Server(scheduler, tokenizer, model, model_id, int(time.time()))

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{
            "id": model.name, "object": "model", "created": server.started, "owned_by": "appo-jax",
            "max_model_len": model.context_len, "model_id": model_id}]})

    async def health(request: Request) -> JSONResponse:
        status = scheduler.status()
        body = {"status": "ok" if status["running"] else "error", "model": model.name, "model_id": model_id,
                "context": model.context_len, **status}
        return JSONResponse(body, status_code=200 if status["running"] else 503)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        if manage_scheduler:
            scheduler.start()
        try:
            yield
        finally:
            if manage_scheduler:
                scheduler.stop()

    routes = [Route("/v1/chat/completions", _generation_endpoint(server, True), methods=["POST"]),
              Route("/v1/completions", _generation_endpoint(server, False), methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={RequestError: _request_error, HTTPException: _http_error})


async def _request_error(request: Request, err: RequestError) -> JSONResponse:
    return JSONResponse(error_body(err.message, err.type, err.param, err.code), status_code=err.status)


async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
    message = f"{request.method} {request.url.path}: {err.detail}"
    return JSONResponse(error_body(message, "invalid_request_error", None, str(err.status_code)),
                        status_code=err.status_code)
