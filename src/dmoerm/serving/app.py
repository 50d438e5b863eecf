"""HTTP reward server with dynamic batching, for RL loops (OpenRLHF, TRL, custom).

The server wraps any :class:`~dmoerm.outputs.Scorer` (a single reward model, a DMoERM, an ensemble) in an
ASGI app (FastAPI, run by uvicorn). Endpoints:

* ``POST /get_reward``: OpenRLHF's remote reward model API. Body ``{"query": [str, ...], "prompts": [...],
  "labels": [...]}`` (full rendered prompt+response strings; ``prompts`` and ``labels`` are accepted and
  ignored); answer ``{"rewards": [float, ...], "scores": [float, ...], "extra_logs": {key: [float, ...]}}``
  where ``extra_logs`` carries DMoERM's routing and capability scores per item (empty for a single reward
  model); see :mod:`dmoerm.serving_formats`.
* ``POST /classify`` and ``POST /pooling``: vLLM's classification and pooling APIs (what verl's reward loop
  calls): body ``{"model": ..., "input": str | [str, ...]}`` or ``{"model": ..., "messages": [...]}``; the
  reward is ``data[i]["probs"][0]`` (``data[i]["data"][0]`` for pooling).
* ``POST /score``: the richer API. Body ``{"items": [{"conversation": [{"role", "content"}], "response":
  str}]}``; answer ``{"results": [{"reward", "raw_reward", "category", "category_probability",
  "capability_scores"}], "normalized": bool}``.
* ``GET /health``: liveness (never needs the token). ``GET /stats``: counters and batch sizes.

Concurrent requests are merged: one worker coroutine drains a queue until it holds ``max_batch_size`` items
or ``max_wait_ms`` passed, runs the scorer in a dedicated thread (the event loop keeps serving) and resolves
each request's future. A request whose client disconnects is dropped from the queue, or its result
discarded if it was already being scored.

:func:`serve_model` (``dmoerm serve``) loads a model directory with :func:`dmoerm.model.load_model` and serves
it with the settings of a :class:`ServeModelConfig`; :func:`serve` serves any scorer object.

Bad input gets a 4xx JSON answer ``{"error": {"code": ..., "message": ...}}``; anything unexpected gets a
generic 500 (the trace is logged server-side, never sent). A text over ``max_text_chars`` is refused (413)
before anything tokenises it; a lone surrogate is a 422 naming the field; JSON of a large body is parsed off
the event loop; a client that does not deliver its whole request within ``request_timeout_s`` is answered 408
and disconnected (:mod:`dmoerm.serving_http`). Nothing here runs at import time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hmac
import ipaddress
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response

from dmoerm import serving_formats as formats
from dmoerm.data import Message
from dmoerm.outputs import InputTooLongError, RewardOutput, Scorer
from dmoerm.rl import RewardNormalization, load_normalization
from dmoerm.serving_requests import (
    RequestError,
    parse_classify,
    parse_get_reward,
    parse_json,
    parse_normalize,
    parse_score,
    request_error,
)

logger = logging.getLogger(__name__)

__all__ = [
    "InputTooLongError",
    "ServeConfig",
    "ServeModelConfig",
    "build_model_app",
    "create_app",
    "serve",
    "serve_model",
]


class _ScorerFailedError(RuntimeError):
    """The scorer raised something other than a ValueError (already logged; answered with a generic 500)."""


class _ServerBusyError(RuntimeError):
    """The queue is full or the server is shutting down (answered 503)."""


@dataclass
class ServeConfig:
    """Settings of the reward server. Every field is checked when the config is built."""

    max_batch_size: int = 64
    """Most items (texts or conversation/response pairs) merged into one scorer call. A single request
    bigger than this is scored on its own (the scorer chunks it by ``scorer_batch_size``)."""
    max_wait_ms: float = 5.0
    """How long the worker waits for more requests to fill a batch once it holds one. 0 disables waiting
    (requests that arrived while the previous batch ran are still merged)."""
    scorer_batch_size: int | None = None
    """``batch_size`` passed to the scorer (its forward-pass chunk); None uses ``max_batch_size``."""
    max_items_per_request: int = 512
    """Most items one request may carry; more is answered 413."""
    max_body_bytes: int = 32 * 1024 * 1024
    """Largest accepted request body in bytes; more is answered 413 (from Content-Length, before reading)."""
    max_text_chars: int | None = None
    """Longest accepted text in characters: a ``query``/``input`` string, or a ``/score`` item's conversation
    and response together; more is answered 413 before anything is tokenised. None: 16 characters per token
    of the scorer's ``max_length`` (no real text averages more, so nothing that fits is refused; a 20 MB
    string no longer ties up the scorer for seconds). Raise it to score longer, left-truncated
    conversations."""
    request_timeout_s: float = 60.0
    """Seconds a client has to deliver one whole request (headers and body) from its first byte (or from
    connecting); a slower one is answered 408 and disconnected. Scoring time does not count."""
    keep_alive_s: float = 5.0
    """Seconds an idle keep-alive connection stays open between requests (uvicorn's ``timeout_keep_alive``)."""
    max_queue_items: int = 16384
    """Most items waiting in the queue; a request that would exceed it is answered 503 (back-pressure)."""
    token: str | None = field(default=None, repr=False)
    """Bearer token every endpoint except ``/health`` requires (``Authorization: Bearer <token>``); None
    means no authentication. Compared in constant time, never logged."""
    normalize: bool = True
    """Apply the reward normalization ``(r - mean) / std`` found in ``model_dir``'s
    ``reward_normalization.json`` (see :func:`dmoerm.rl.compute_normalization`). No effect without one."""
    model_dir: str | None = None
    """The reward model directory where the normalization file is looked for; None falls back to the
    scorer's ``model_dir`` attribute if it has one."""
    log_level: str = "info"
    """uvicorn's log level: one of critical, error, warning, info, debug, trace."""
    torch_threads: int | None = None
    """If set, :func:`serve` calls ``torch.set_num_threads`` with it before serving (on a small or shared
    CPU, 1 thread per process avoids OpenMP threads spinning against the HTTP loop). None keeps torch's
    default."""

    def __post_init__(self) -> None:
        def _int(name: str, minimum: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(
                    f"{name}: expected an integer, got {type(value).__name__}; pass e.g. {name}=64"
                )
            if value < minimum:
                raise ValueError(f"{name}: must be at least {minimum}, got {value}")

        _int("max_batch_size", 1)
        if self.scorer_batch_size is not None:
            _int("scorer_batch_size", 1)
        _int("max_items_per_request", 1)
        _int("max_body_bytes", 1024)
        _int("max_queue_items", 1)
        if self.max_queue_items < self.max_items_per_request:
            raise ValueError(
                f"max_queue_items: {self.max_queue_items} is below max_items_per_request "
                f"({self.max_items_per_request}); raise it so one full request fits in the queue"
            )
        if (
            isinstance(self.max_wait_ms, bool)
            or not isinstance(self.max_wait_ms, (int, float))
            or not math.isfinite(self.max_wait_ms)
            or self.max_wait_ms < 0
        ):
            raise ValueError(f"max_wait_ms: expected a finite number >= 0, got {self.max_wait_ms!r}")
        if self.max_wait_ms > 10_000:
            raise ValueError(f"max_wait_ms: {self.max_wait_ms} ms is over 10 s; use a few milliseconds")
        if self.token is not None:
            if not isinstance(self.token, str) or not self.token.strip():
                raise ValueError("token: must be a non-empty string, or None to disable authentication")
            if any(c.isspace() for c in self.token) or not self.token.isascii():
                raise ValueError(
                    "token: use printable ASCII without whitespace (it travels in an HTTP header)"
                )
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize: expected True or False, got {self.normalize!r}")
        if self.model_dir is not None and not isinstance(self.model_dir, str):
            self.model_dir = str(self.model_dir)
        if self.torch_threads is not None:
            _int("torch_threads", 1)
        if self.max_text_chars is not None:
            _int("max_text_chars", 16)
        for name in ("request_timeout_s", "keep_alive_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name}: expected a number of seconds > 0, got {value!r}")
        levels = ("critical", "error", "warning", "info", "debug", "trace")
        if self.log_level not in levels:
            raise ValueError(f"log_level: {self.log_level!r} is not one of {', '.join(levels)}")

    @property
    def effective_scorer_batch_size(self) -> int:
        """The ``batch_size`` actually passed to the scorer."""
        return self.scorer_batch_size or self.max_batch_size

    def text_limit(self, scorer: Any) -> int | None:
        """The character limit applied to texts for ``scorer`` (see ``max_text_chars``); None: none."""
        if self.max_text_chars is not None:
            return self.max_text_chars
        max_length = getattr(scorer, "max_length", None)
        return 16 * int(max_length) if isinstance(max_length, int) and max_length > 0 else None


# ----------------------------------------------------------------------------------------------------------
# Dynamic batching


@dataclass
class _Job:
    """One request's items waiting for the scorer."""

    kind: Literal["texts", "items"]
    future: asyncio.Future = None  # type: ignore[assignment]  # set by the handler, in the event loop
    texts: list[str] = field(default_factory=list)
    conversations: list[list[Message]] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    normalize: bool = True
    count_tokens: bool = False
    """Count the input's tokens (vLLM's ``usage``), in the scorer thread."""
    prompt_tokens: int = 0
    activation: bool = False
    """vLLM endpoints: apply the model's activation (a sigmoid for one label) to the reward."""
    model: str | None = None
    """vLLM endpoints: the ``model`` the request named (echoed back)."""

    def __len__(self) -> int:
        return len(self.texts) if self.kind == "texts" else len(self.responses)


class _Stats:
    """Counters the ``/stats`` endpoint reports."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.requests = 0
        self.items_scored = 0
        self.batches = 0
        self.batch_items = collections.Counter[int]()
        self.batch_requests = collections.Counter[int]()
        self.recent_batch_items: collections.deque[int] = collections.deque(maxlen=256)
        self.max_batch_items = 0
        self.max_batch_requests = 0
        self.scoring_seconds = 0.0
        self.dropped_requests = 0
        self.discarded_results = 0
        self.client_errors = 0
        self.server_errors = 0

    def as_dict(self, queue_items: int) -> dict[str, Any]:
        uptime = time.monotonic() - self.started
        return {
            "uptime_s": round(uptime, 3),
            "requests": self.requests,
            "items_scored": self.items_scored,
            "batches": self.batches,
            "mean_batch_items": (self.items_scored / self.batches) if self.batches else 0.0,
            "max_batch_items": self.max_batch_items,
            "max_batch_requests": self.max_batch_requests,
            "batch_items_histogram": {str(k): v for k, v in sorted(self.batch_items.items())},
            "batch_requests_histogram": {str(k): v for k, v in sorted(self.batch_requests.items())},
            "recent_batch_items": list(self.recent_batch_items),
            "scoring_seconds": round(self.scoring_seconds, 4),
            "items_per_scoring_second": (self.items_scored / self.scoring_seconds)
            if self.scoring_seconds
            else 0.0,
            "queue_items": queue_items,
            "dropped_requests": self.dropped_requests,
            "discarded_results": self.discarded_results,
            "client_errors": self.client_errors,
            "server_errors": self.server_errors,
        }


class _Batcher:
    """The queue and its single worker; lives inside the running event loop."""

    def __init__(self, scorer: Scorer, config: ServeConfig) -> None:
        self.scorer = scorer
        self.config = config
        self.stats = _Stats()
        self._pending: collections.deque[_Job] = collections.deque()
        self._pending_items = 0
        self._wakeup = asyncio.Event()
        self._closed = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dmoerm-scorer")
        self._task: asyncio.Task | None = None

    @property
    def queue_items(self) -> int:
        return self._pending_items

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="dmoerm-batcher")

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(_ServerBusyError("the server is shutting down"))
        self._pending_items = 0
        self._executor.shutdown(wait=False, cancel_futures=True)

    def submit(self, job: _Job) -> None:
        if self._closed:
            raise _ServerBusyError("the server is shutting down")
        if self._task is not None and self._task.done():
            raise _ServerBusyError("the scoring worker stopped; restart the server")
        if self._pending_items + len(job) > self.config.max_queue_items:
            raise _ServerBusyError(f"queue full ({self._pending_items} items waiting); retry later")
        self._pending.append(job)
        self._pending_items += len(job)
        self._wakeup.set()

    def _pop(self) -> _Job:
        job = self._pending.popleft()
        self._pending_items -= len(job)
        return job

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        max_items = self.config.max_batch_size
        wait_s = self.config.max_wait_ms / 1000.0
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            batch: list[_Job] = []
            n = 0
            deadline = loop.time() + wait_s
            while True:
                if self._pending:
                    job = self._pending[0]
                    if job.future.done():  # the client went away while it waited
                        self._pop()
                        self.stats.dropped_requests += 1
                        continue
                    if batch and n + len(job) > max_items:
                        break
                    batch.append(self._pop())
                    n += len(job)
                    if n >= max_items:
                        break
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0 or not batch:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            if batch:
                try:
                    await self._execute(batch)
                except asyncio.CancelledError:
                    raise
                except Exception:  # never let the worker die
                    logger.exception("scoring worker: unexpected failure; failing the batch's requests")
                    for job in batch:
                        if not job.future.done():
                            job.future.set_exception(_ScorerFailedError("internal error"))

    def _score_jobs(self, jobs: Sequence[_Job]) -> list[list[RewardOutput]]:
        """Runs in the scorer thread: one scorer call per kind, results split back per job."""
        batch_size = self.config.effective_scorer_batch_size
        text_jobs = [j for j in jobs if j.kind == "texts"]
        item_jobs = [j for j in jobs if j.kind == "items"]
        out: dict[int, list] = {}
        if text_jobs:
            texts = [t for j in text_jobs for t in j.texts]
            rewards = formats.score_texts_outputs(self.scorer, texts, batch_size)
            if len(rewards) != len(texts):
                raise RuntimeError(f"scorer returned {len(rewards)} rewards for {len(texts)} texts")
            start = 0
            for j in text_jobs:
                out[id(j)] = rewards[start : start + len(j)]
                start += len(j)
        if item_jobs:
            convs = [c for j in item_jobs for c in j.conversations]
            resps = [r for j in item_jobs for r in j.responses]
            outputs = list(self.scorer.score(convs, resps, batch_size=batch_size))
            if len(outputs) != len(resps):
                raise RuntimeError(f"scorer returned {len(outputs)} outputs for {len(resps)} items")
            start = 0
            for j in item_jobs:
                out[id(j)] = outputs[start : start + len(j)]
                start += len(j)
        tokenizer = getattr(self.scorer, "tokenizer", None)
        for j in jobs:
            if j.count_tokens and tokenizer is not None:
                texts = j.texts or [m.content for c in j.conversations for m in c] + j.responses
                j.prompt_tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
        return [out[id(j)] for j in jobs]

    async def _execute(self, batch: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        n = sum(len(j) for j in batch)
        t0 = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._executor, self._score_jobs, batch)
        except Exception as exc:
            self.stats.scoring_seconds += time.perf_counter() - t0
            if len(batch) == 1:
                self._resolve_error(batch[0], exc)
                return
            # One bad request (e.g. a text over the token limit) must not fail the others: isolate it.
            logger.info(
                "batch of %d requests failed (%s); scoring them one by one", len(batch), type(exc).__name__
            )
            for job in batch:
                if job.future.done():
                    self.stats.discarded_results += 1
                    continue
                await self._execute([job])
            return
        self.stats.scoring_seconds += time.perf_counter() - t0
        self.stats.batches += 1
        self.stats.items_scored += n
        self.stats.batch_items[n] += 1
        self.stats.batch_requests[len(batch)] += 1
        self.stats.recent_batch_items.append(n)
        self.stats.max_batch_items = max(self.stats.max_batch_items, n)
        self.stats.max_batch_requests = max(self.stats.max_batch_requests, len(batch))
        for job, result in zip(batch, results, strict=True):
            if job.future.done():
                self.stats.discarded_results += 1
            else:
                job.future.set_result(result)

    def _resolve_error(self, job: _Job, exc: BaseException) -> None:
        if job.future.done():
            self.stats.discarded_results += 1
            return
        if isinstance(exc, ValueError):
            job.future.set_exception(exc)
        else:
            logger.error("scorer failed on a request of %d items", len(job), exc_info=exc)
            job.future.set_exception(_ScorerFailedError("internal error"))


# ----------------------------------------------------------------------------------------------------------
# The app


_INLINE_PARSE_BYTES = 256 * 1024
"""Bodies up to this size are parsed in the event loop (microseconds); larger ones in a worker thread."""


def _error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise request_error(
                    413, "body_too_large", f"body of {declared} bytes is over the {limit} byte limit"
                )
        except ValueError:
            raise request_error(400, "invalid_request", "bad Content-Length header") from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise request_error(413, "body_too_large", f"body is over the {limit} byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has already been read)."""
    while True:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            return


def _resolve_normalization(scorer: Scorer, config: ServeConfig) -> RewardNormalization | None:
    if not config.normalize:
        return None
    model_dir = config.model_dir or getattr(scorer, "model_dir", None)
    if not model_dir:
        return None
    norm = load_normalization(model_dir)
    if norm is not None:
        logger.info(
            "applying reward normalization from %s: mean=%.6g std=%.6g", model_dir, norm.mean, norm.std
        )
    return norm


def create_app(scorer: Scorer, config: ServeConfig | None = None) -> FastAPI:
    """Build the ASGI app serving ``scorer``; the batching worker starts with the app's lifespan.

    The normalization file (if any, and if ``config.normalize``) is read here, once.
    """
    from starlette.exceptions import HTTPException as StarletteHTTPException

    config = config or ServeConfig()
    if not hasattr(scorer, "score") or not hasattr(scorer, "score_texts"):
        raise TypeError(
            f"scorer: {type(scorer).__name__} does not implement the Scorer protocol (score, score_texts)"
        )
    normalization = _resolve_normalization(scorer, config)
    text_limit = config.text_limit(scorer)
    breakdown_keys = formats.breakdown_keys(scorer)
    categories = list(getattr(scorer, "categories", None) or []) or None
    folder = config.model_dir or getattr(scorer, "model_dir", None)
    model_name = Path(folder).name if folder else type(scorer).__name__  # echoed as vLLM's "model"; no path
    expected_auth = f"Bearer {config.token}".encode() if config.token else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher = _Batcher(scorer, config)
        batcher.start()
        app.state.batcher = batcher
        logger.info(
            "reward server ready: max_batch_size=%d max_wait_ms=%g normalization=%s auth=%s",
            config.max_batch_size,
            config.max_wait_ms,
            "on" if normalization else "off",
            "on" if expected_auth else "off",
        )
        try:
            yield
        finally:
            await batcher.close()

    app = FastAPI(
        title="dmoerm reward server",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.config = config
    app.state.normalization = normalization

    def check_auth(request: Request) -> JSONResponse | None:
        if expected_auth is None:
            return None
        given = request.headers.get("authorization", "").encode("latin-1", errors="replace")
        if hmac.compare_digest(given, expected_auth):
            return None
        return _error_response(
            401, "unauthorized", "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
        )

    async def run_job(request: Request, job: _Job) -> Any:
        """Queue ``job`` and wait for its result, or for the client to go away (then None)."""
        batcher: _Batcher = request.app.state.batcher
        batcher.submit(job)
        watcher = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            done, _ = await asyncio.wait({job.future, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if job.future in done:
            return job.future.result()
        job.future.cancel()  # the worker drops it if still queued, or discards the result
        logger.debug("client disconnected; %d queued items dropped", len(job))
        return None

    def normalized(rewards: list[float]) -> list[float]:
        return normalization.apply(rewards) if normalization is not None else rewards

    def rewards_of(job: _Job, outputs: list[RewardOutput]) -> list[float]:
        raw = [float(o.reward) for o in outputs]
        return normalized(raw) if job.normalize else raw

    async def parse_body(body: bytes, parse: Callable[[Any], _Job]) -> _Job:
        if len(body) <= _INLINE_PARSE_BYTES:
            return parse(parse_json(body))
        # A large body's JSON and checks take a while: the event loop keeps serving meanwhile.
        return await asyncio.to_thread(lambda: parse(parse_json(body)))

    async def handle(
        request: Request, parse: Callable[[Any], _Job], render: Callable[[_Job, Any], dict]
    ) -> Any:
        stats: _Stats = request.app.state.batcher.stats
        denied = check_auth(request)
        if denied is not None:
            stats.client_errors += 1
            return denied
        try:
            body = await _read_body(request, config.max_body_bytes)
            job = await parse_body(body, parse)
            job.future = asyncio.get_running_loop().create_future()
            stats.requests += 1
            result = await run_job(request, job)
            if result is None:  # the client is gone; nobody reads this
                return Response(status_code=499)
            return JSONResponse(render(job, result))
        except RequestError as exc:
            stats.client_errors += 1
            return _error_response(exc.status, exc.code, exc.message)
        except ClientDisconnect:  # gone (or timed out by the protocol) while sending its body
            return Response(status_code=499)
        except _ServerBusyError as exc:
            return _error_response(503, "unavailable", str(exc), headers={"Retry-After": "1"})
        except _ScorerFailedError:  # logged with its trace by the worker
            stats.server_errors += 1
            return _error_response(500, "internal_error", "internal server error")
        except InputTooLongError as exc:
            stats.client_errors += 1
            return _error_response(413, "input_too_long", str(exc))
        except ValueError as exc:  # raised by the scorer for this request's input
            stats.client_errors += 1
            return _error_response(422, "invalid_input", str(exc))
        except Exception:
            stats.server_errors += 1
            logger.exception("internal error while serving %s", request.url.path)
            return _error_response(500, "internal_error", "internal server error")

    @app.post("/get_reward")
    async def get_reward(request: Request) -> Any:
        """OpenRLHF remote reward API: ``{"query", "prompts", "labels"}`` -> ``{"rewards", "scores",
        "extra_logs"}``. OpenRLHF's own server answers ``{"rewards": r, "scores": r, "extra_logs": {...}}``
        (openrlhf/cli/serve_rm.py line 133); here ``extra_logs`` holds the DMoERM breakdown."""

        def parse(payload: Any) -> _Job:
            texts = parse_get_reward(payload, config, text_limit)
            return _Job("texts", texts=texts, normalize=parse_normalize(payload))

        def render(job: _Job, outputs: list[RewardOutput]) -> dict:
            rewards = [_finite_or_none(r) for r in rewards_of(job, outputs)]
            logs = formats.extra_logs(outputs, breakdown_keys, categories)
            return {"rewards": rewards, "scores": rewards, "extra_logs": logs}

        return await handle(request, parse, render)

    def vllm_parse(payload: Any) -> _Job:
        kind, parsed = parse_classify(payload, config, text_limit)
        if kind == "texts":
            job = _Job("texts", texts=parsed, count_tokens=True)
        else:
            job = _Job("items", conversations=parsed[0], responses=parsed[1], count_tokens=True)
        job.activation = formats.use_activation(payload)
        job.model = payload.get("model") if isinstance(payload.get("model"), str) else None
        return job

    def vllm_values(job: _Job, outputs: list[RewardOutput]) -> list[float | None]:
        values = rewards_of(job, outputs)
        if job.activation:
            values = [formats.sigmoid(v) if math.isfinite(v) else v for v in values]
        return [_finite_or_none(v) for v in values]

    @app.post("/classify")
    async def classify(request: Request) -> Any:
        """vLLM's classification API, as verl's reward loop calls it: the reward is ``data[i]["probs"][0]``
        (verl reads ``output["data"][-1]["probs"][-1]``, verl/experimental/reward_loop/reward_loop.py l. 213)."""

        def render(job: _Job, outputs: list[RewardOutput]) -> dict:
            name = job.model or model_name
            return formats.classification_response(name, vllm_values(job, outputs), job.prompt_tokens)

        return await handle(request, vllm_parse, render)

    @app.post("/pooling")
    async def pooling(request: Request) -> Any:
        """vLLM's pooling API: the reward is ``data[i]["data"][0]``."""

        def render(job: _Job, outputs: list[RewardOutput]) -> dict:
            name = job.model or model_name
            return formats.pooling_response(name, vllm_values(job, outputs), job.prompt_tokens)

        return await handle(request, vllm_parse, render)

    @app.post("/score")
    async def score(request: Request) -> Any:
        """Rich API: reward, category with probability, capability scores per item."""

        def parse(payload: Any) -> _Job:
            convs, resps = parse_score(payload, config, text_limit)
            return _Job("items", conversations=convs, responses=resps, normalize=parse_normalize(payload))

        def render(job: _Job, outputs: list[RewardOutput]) -> dict:
            raw = [float(o.reward) for o in outputs]
            applied = job.normalize and normalization is not None
            rewards = normalized(raw) if applied else raw
            results = []
            for o, r, rr in zip(outputs, rewards, raw, strict=True):
                results.append(
                    {
                        "reward": _finite_or_none(r),
                        "raw_reward": _finite_or_none(rr),
                        "category": o.category,
                        "category_probability": None
                        if o.category_probability is None
                        else _finite_or_none(float(o.category_probability)),
                        "capability_scores": {
                            k: _finite_or_none(float(v)) for k, v in o.capability_scores.items()
                        },
                    }
                )
            return {"results": results, "normalized": applied}

        return await handle(request, parse, render)

    @app.get("/health")
    async def health(request: Request) -> Any:
        """Liveness; needs no token. ``categories`` lists the index of ``extra_logs``' ``category_index``."""
        batcher: _Batcher = request.app.state.batcher
        return {
            "status": "ok",
            "max_length": int(getattr(scorer, "max_length", 0) or 0),
            "max_text_chars": text_limit,
            "categories": categories,
            "queue_items": batcher.queue_items,
        }

    @app.get("/stats")
    async def stats(request: Request) -> Any:
        """Counters: requests, items, batch size histograms (to see merging), errors."""
        denied = check_auth(request)
        if denied is not None:
            return denied
        batcher: _Batcher = request.app.state.batcher
        out = batcher.stats.as_dict(batcher.queue_items)
        out["normalization"] = (
            None if normalization is None else {"mean": normalization.mean, "std": normalization.std}
        )
        out["config"] = {
            "max_batch_size": config.max_batch_size,
            "max_wait_ms": config.max_wait_ms,
            "max_items_per_request": config.max_items_per_request,
        }
        return out

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error_response(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s", request.url.path, exc_info=exc)
        return _error_response(500, "internal_error", "internal server error")

    return app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_bind(host: str, port: int, config: ServeConfig) -> None:
    if not isinstance(host, str) or not host.strip():
        raise ValueError("host: expected an interface address such as 127.0.0.1")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port: expected an integer in 0..65535, got {port!r}")
    if not _is_loopback(host) and config.token is None:
        logger.warning(
            "serving on %s without a token: anyone who can reach %s:%d can query the model", host, host, port
        )


def _run_uvicorn(app: FastAPI, host: str, port: int, config: ServeConfig) -> None:
    import uvicorn

    from dmoerm.serving_http import uvicorn_config

    uvicorn.Server(uvicorn_config(app, host, port, config)).run()


def serve(
    scorer: Scorer, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None
) -> None:
    """Serve ``scorer`` over HTTP until interrupted (blocking; uvicorn, one process).

    Binds the loopback interface by default; binding another interface without ``config.token`` logs a
    warning, since anyone who reaches the port can then use the model.
    """
    config = config or ServeConfig()
    _check_bind(host, port, config)
    if config.torch_threads is not None:
        import torch

        torch.set_num_threads(config.torch_threads)
    _run_uvicorn(create_app(scorer, config), host, port, config)


@dataclass
class ServeModelConfig(ServeConfig):
    """``dmoerm serve``: a model directory, where to listen, and every :class:`ServeConfig` setting.

    ``model_dir`` is required here: the model is loaded from it (:func:`dmoerm.model.load_model`, a single
    reward model or a DMoERM) and its ``reward_normalization.json`` applied (``normalize``). Every field is
    checked when the config is built.
    """

    host: str = "127.0.0.1"
    """Interface to bind. The default answers this machine only; another address without ``token`` (or
    ``token_file``) logs a warning."""
    port: int = 8000
    """TCP port (0 lets the system pick a free one)."""
    token_file: str | None = None
    """A file whose first line is the bearer token (keeps it out of the process list and shell history);
    cannot be combined with ``token``."""
    warmup: bool = True
    """Score one short item before accepting requests, so the first client does not pay the lazy set-up."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.model_dir or not str(self.model_dir).strip():
            raise ValueError(
                "model_dir: required; pass a trained dmoerm model directory, e.g. runs/main/model"
            )
        if not isinstance(self.host, str) or not self.host.strip():
            raise ValueError(f"host: expected an interface address such as 127.0.0.1, got {self.host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port: expected an integer in 0..65535, got {self.port!r}")
        if self.token_file is not None:
            if self.token is not None:
                raise ValueError("token_file: give either token or token_file, not both")
            if not isinstance(self.token_file, str) or not self.token_file.strip():
                raise ValueError("token_file: expected a file path, or None")
        if not isinstance(self.warmup, bool):
            raise ValueError(f"warmup: expected True or False, got {self.warmup!r}")

    def resolved(self) -> ServeModelConfig:
        """A copy whose ``token`` is read from ``token_file`` (checked like ``token``); self without one."""
        if self.token_file is None:
            return self
        path = Path(self.token_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"token_file: cannot read {path} ({type(exc).__name__})") from None
        token = lines[0].strip() if lines else ""
        if not token:
            raise ValueError(f"token_file: {path} is empty; write the token on its first line")
        try:
            return dataclasses.replace(self, token=token, token_file=None)
        except ValueError as exc:
            raise ValueError(f"token_file: the token in {path} is not usable: {exc}") from None


def build_model_app(config: ServeModelConfig) -> FastAPI:
    """Load ``config.model_dir`` and build its app (what :func:`serve_model` runs); does not listen."""
    from dmoerm.model import load_model

    if not isinstance(config, ServeModelConfig):
        raise TypeError(f"config: expected a ServeModelConfig, got {type(config).__name__}")
    config = config.resolved()
    folder = Path(config.model_dir)  # type: ignore[arg-type]
    if not folder.is_dir():
        raise ValueError(f"model_dir: {folder} is not a directory")
    if config.torch_threads is not None:
        import torch

        torch.set_num_threads(config.torch_threads)
    t0 = time.perf_counter()
    scorer = load_model(folder)
    logger.info(
        "loaded %s from %s in %.1f s (max_length %d)",
        type(scorer).__name__,
        folder,
        time.perf_counter() - t0,
        scorer.max_length,
    )
    if config.warmup:
        scorer.score([[Message("user", "Hello")]], ["Hello! How can I help?"], batch_size=1)
    return create_app(scorer, config)


def serve_model(config: ServeModelConfig) -> None:
    """``dmoerm serve``: load the model in ``config.model_dir`` and serve it until interrupted (blocking)."""
    config = config.resolved()
    _check_bind(config.host, config.port, config)
    app = build_model_app(config)
    logger.info("serving %s on http://%s:%d", config.model_dir, config.host, config.port)
    _run_uvicorn(app, config.host, config.port, config)
