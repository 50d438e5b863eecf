"""HTTP reward server with dynamic batching, for RL loops (OpenRLHF, TRL, custom).

The server wraps any :class:`~dmoerm.outputs.Scorer` (a single reward model, a DMoERM, an ensemble) in an
ASGI app (FastAPI, run by uvicorn). Endpoints:

* ``POST /get_reward``: OpenRLHF's remote reward model API. Body ``{"query": [str, ...], "prompts": [...],
  "labels": [...]}`` (full rendered prompt+response strings; ``prompts`` and ``labels`` are accepted and
  ignored); answer ``{"rewards": [float, ...], "scores": [float, ...], "extra_logs": {key: [float, ...]}}``
  where ``extra_logs`` carries DMoERM's routing and capability scores per item (empty for a single reward
  model); see :mod:`dmoerm.serving.formats`.
* ``POST /classify`` and ``POST /pooling``: vLLM's classification and pooling APIs (what verl's reward loop
  calls): body ``{"model": ..., "input": str | [str, ...]}`` or ``{"model": ..., "messages": [...]}``; the
  reward is ``data[i]["probs"][0]`` (``data[i]["data"][0]`` for pooling).
* ``POST /score``: the richer API. Body ``{"items": [{"conversation": [{"role", "content"}], "response":
  str}]}``; answer ``{"results": [{"reward", "raw_reward", "category", "category_probability",
  "capability_scores"}], "normalized": bool}``.
* ``GET /health``: liveness (never needs the token). ``GET /stats``: counters and batch sizes.

Concurrent requests are merged by the micro-batcher (:mod:`dmoerm.serving.batcher`). Bodies are validated by
FastAPI against the pydantic models of :mod:`dmoerm.serving.schemas`; the routes here are module-level
functions, and :class:`ScoringRoute` reads each scoring request's body under its byte limit (after the token
check) before FastAPI validates it.

:func:`serve_model` (``dmoerm serve``) loads a model directory with :func:`dmoerm.model.load_model` and serves
it with the settings of a :class:`ServeModelConfig`; :func:`serve` serves any scorer object
(:mod:`dmoerm.serving.server`).

Bad input gets a 4xx JSON answer ``{"error": {"code": ..., "message": ...}}``; anything unexpected gets a
generic 500 (the trace is logged server-side, never sent). A text over ``max_text_chars`` is refused (413)
before anything tokenises it; a lone surrogate is a 422 naming the field; JSON of a large body is parsed off
the event loop; a client that does not deliver its whole request within ``request_timeout_s`` is answered 408
and disconnected (:mod:`dmoerm.serving.http`). Nothing here runs at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response

from dmoerm.outputs import InputTooLongError, RewardOutput, Scorer
from dmoerm.rl import RewardNormalization, load_normalization
from dmoerm.serving import formats, schemas
from dmoerm.serving.batcher import _Batcher, _Job, _ScorerFailedError, _ServerBusyError, _Stats
from dmoerm.serving.config import ServeConfig
from dmoerm.serving.schemas import (
    ClassificationResponse,
    ClassifyRequest,
    GetRewardRequest,
    GetRewardResponse,
    HealthResponse,
    PoolingResponse,
    ScoreRequest,
    ScoreResponse,
    ScoreResult,
)
from dmoerm.serving.validation import RequestError, parse_json, read_body

logger = logging.getLogger(__name__)

__all__ = ["ScoringRoute", "create_app"]

_INLINE_PARSE_BYTES = 256 * 1024
"""Bodies up to this size are parsed in the event loop (microseconds); larger ones in a worker thread."""


@dataclass(frozen=True)
class _Server:
    """What the routes of one app read (``app.state.server``): the scorer and what is derived from it once."""

    scorer: Scorer
    config: ServeConfig
    normalization: RewardNormalization | None
    limits: schemas.RequestLimits
    breakdown_keys: list[str] | None
    categories: list[str] | None
    model_name: str
    """Echoed as vLLM's ``model`` when a request names none: the model folder's name, never a path."""
    expected_auth: bytes | None

    def rewards_of(self, job: _Job, outputs: list[RewardOutput]) -> list[float]:
        raw = [float(o.reward) for o in outputs]
        return self.normalized(raw) if job.normalize else raw

    def normalized(self, rewards: list[float]) -> list[float]:
        return self.normalization.apply(rewards) if self.normalization is not None else rewards


def _server(request: Request) -> _Server:
    return request.app.state.server


def _error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


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


def _check_auth(request: Request) -> JSONResponse | None:
    expected = _server(request).expected_auth
    if expected is None:
        return None
    given = request.headers.get("authorization", "").encode("latin-1", errors="replace")
    if hmac.compare_digest(given, expected):
        return None
    return _error_response(
        401, "unauthorized", "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
    )


# ----------------------------------------------------------------------------------------------------------
# Reading, validating and answering a scoring request


async def _parse_body(body: bytes) -> Any:
    if len(body) <= _INLINE_PARSE_BYTES:
        return parse_json(body)
    # A large body's JSON takes a while: the event loop keeps serving meanwhile.
    return await asyncio.to_thread(parse_json, body)


class _ParsedRequest(Request):
    """The request with its body already read and parsed; FastAPI validates ``json()`` against the route's model.

    Its Content-Type reads ``application/json`` whatever the client sent: every body is JSON, as the server
    always took it (``curl -d`` sends ``application/x-www-form-urlencoded``)."""

    def __init__(self, request: Request, body: bytes, payload: Any) -> None:
        headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
        super().__init__(
            {**request.scope, "headers": [*headers, (b"content-type", b"application/json")]}, request.receive
        )
        self._read = body
        self._payload = payload

    async def body(self) -> bytes:
        return self._read

    async def json(self) -> Any:
        return self._payload


def _answer_error(exc: Exception, stats: _Stats, path: str) -> Response:
    """The answer to what a scoring request raised (counted in ``/stats``); a trace is logged, never sent."""
    if isinstance(exc, RequestError):
        stats.client_errors += 1
        return _error_response(exc.status, exc.code, exc.message)
    if isinstance(exc, ClientDisconnect):  # gone (or timed out by the protocol) while sending its body
        return Response(status_code=499)
    if isinstance(exc, _ServerBusyError):
        return _error_response(503, "unavailable", str(exc), headers={"Retry-After": "1"})
    if isinstance(exc, _ScorerFailedError):  # logged with its trace by the worker
        stats.server_errors += 1
        return _error_response(500, "internal_error", "internal server error")
    if isinstance(exc, InputTooLongError):  # the one class (dmoerm.outputs), never a look-alike by name
        stats.client_errors += 1
        return _error_response(413, "input_too_long", str(exc))
    if isinstance(exc, ValueError):  # raised by the scorer for this request's input
        stats.client_errors += 1
        return _error_response(422, "invalid_input", str(exc))
    stats.server_errors += 1
    logger.error("internal error while serving %s", path, exc_info=exc)
    return _error_response(500, "internal_error", "internal server error")


class ScoringRoute(APIRoute):
    """A scoring endpoint: the token is checked, then the body read under ``max_body_bytes`` and parsed (off
    the event loop when large), then FastAPI validates it against the endpoint's request model under the
    server's :class:`~dmoerm.serving.schemas.RequestLimits`; every failure is answered as before."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        validate_and_run = super().get_route_handler()
        request_model = self.body_field.field_info.annotation if self.body_field is not None else None

        async def handler(request: Request) -> Response:
            server = _server(request)
            stats: _Stats = request.app.state.batcher.stats
            denied = _check_auth(request)
            if denied is not None:
                stats.client_errors += 1
                return denied
            try:
                body = await read_body(request, server.config.max_body_bytes)
                parsed = _ParsedRequest(request, body, await _parse_body(body))
                with schemas.request_limits(server.limits):
                    return await validate_and_run(parsed)
            except RequestValidationError as exc:
                return _answer_error(schemas.request_error_of(exc.errors(), request_model), stats, "")
            except Exception as exc:
                return _answer_error(exc, stats, request.url.path)

        return handler


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has already been read)."""
    while True:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            return


async def _run_job(request: Request, job: _Job) -> Any:
    """Queue ``job`` and wait for its result, or for the client to go away (then None)."""
    batcher: _Batcher = request.app.state.batcher
    batcher.stats.requests += 1
    job.future = asyncio.get_running_loop().create_future()
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


# ----------------------------------------------------------------------------------------------------------
# Routes

scoring_routes = APIRouter(route_class=ScoringRoute)
status_routes = APIRouter()


@scoring_routes.post("/get_reward", response_model=GetRewardResponse)
async def get_reward(body: GetRewardRequest, request: Request) -> Any:
    """OpenRLHF remote reward API: ``{"query", "prompts", "labels"}`` -> ``{"rewards", "scores",
    "extra_logs"}``. OpenRLHF's own server answers ``{"rewards": r, "scores": r, "extra_logs": {...}}``
    (openrlhf/cli/serve_rm.py line 133); here ``extra_logs`` holds the DMoERM breakdown."""
    server = _server(request)
    job = _Job("texts", texts=body.query, normalize=body.normalize)
    outputs = await _run_job(request, job)
    if outputs is None:  # the client is gone; nobody reads this
        return Response(status_code=499)
    rewards = [_finite_or_none(r) for r in server.rewards_of(job, outputs)]
    logs = formats.extra_logs(outputs, server.breakdown_keys, server.categories)
    return GetRewardResponse(rewards=rewards, scores=rewards, extra_logs=logs)


def _classify_job(body: ClassifyRequest) -> _Job:
    if body.items is None:
        job = _Job("texts", texts=body.input or [], count_tokens=True)
    else:
        convs, resps = [i.messages() for i in body.items], [i.response for i in body.items]
        job = _Job("items", conversations=convs, responses=resps, count_tokens=True)
    job.activation = formats.use_activation(
        {"softmax": body.softmax, "activation": body.activation, "use_activation": body.use_activation}
    )
    job.model = body.model if isinstance(body.model, str) else None
    return job


async def _classify_values(request: Request, body: ClassifyRequest) -> tuple[_Job, list[float | None] | None]:
    """Score a vLLM request: its job and its values (the activation applied if asked); None: client gone."""
    job = _classify_job(body)
    outputs = await _run_job(request, job)
    if outputs is None:
        return job, None
    values = _server(request).rewards_of(job, outputs)
    if job.activation:
        values = [formats.sigmoid(v) if math.isfinite(v) else v for v in values]
    return job, [_finite_or_none(v) for v in values]


@scoring_routes.post("/classify", response_model=ClassificationResponse)
async def classify(body: ClassifyRequest, request: Request) -> Any:
    """vLLM's classification API, as verl's reward loop calls it: the reward is ``data[i]["probs"][0]``
    (verl reads ``output["data"][-1]["probs"][-1]``, verl/experimental/reward_loop/reward_loop.py l. 213)."""
    job, values = await _classify_values(request, body)
    if values is None:
        return Response(status_code=499)
    name = job.model or _server(request).model_name
    return formats.classification_response(name, values, job.prompt_tokens)


@scoring_routes.post("/pooling", response_model=PoolingResponse)
async def pooling(body: ClassifyRequest, request: Request) -> Any:
    """vLLM's pooling API: the reward is ``data[i]["data"][0]``."""
    job, values = await _classify_values(request, body)
    if values is None:
        return Response(status_code=499)
    name = job.model or _server(request).model_name
    return formats.pooling_response(name, values, job.prompt_tokens)


@scoring_routes.post("/score", response_model=ScoreResponse)
async def score(body: ScoreRequest, request: Request) -> Any:
    """Rich API: reward, category with probability, capability scores per item."""
    server = _server(request)
    convs, resps = [i.messages() for i in body.items], [i.response for i in body.items]
    job = _Job("items", conversations=convs, responses=resps, normalize=body.normalize)
    outputs = await _run_job(request, job)
    if outputs is None:
        return Response(status_code=499)
    raw = [float(o.reward) for o in outputs]
    applied = job.normalize and server.normalization is not None
    rewards = server.normalized(raw) if applied else raw
    results = [
        ScoreResult(
            reward=_finite_or_none(r),
            raw_reward=_finite_or_none(rr),
            category=o.category,
            category_probability=None
            if o.category_probability is None
            else _finite_or_none(float(o.category_probability)),
            capability_scores={k: _finite_or_none(float(v)) for k, v in o.capability_scores.items()},
        )
        for o, r, rr in zip(outputs, rewards, raw, strict=True)
    ]
    return ScoreResponse(results=results, normalized=applied)


@status_routes.get("/health", response_model=HealthResponse)
async def health(request: Request) -> Any:
    """Liveness; needs no token. ``categories`` lists the index of ``extra_logs``' ``category_index``."""
    server = _server(request)
    return HealthResponse(
        status="ok",
        max_length=int(getattr(server.scorer, "max_length", 0) or 0),
        max_text_chars=server.limits.max_text_chars,
        categories=server.categories,
        queue_items=request.app.state.batcher.queue_items,
    )


@status_routes.get("/stats")
async def stats(request: Request) -> Any:
    """Counters: requests, items, batch size histograms (to see merging), errors."""
    denied = _check_auth(request)
    if denied is not None:
        return denied
    server = _server(request)
    batcher: _Batcher = request.app.state.batcher
    out = batcher.stats.as_dict(batcher.queue_items)
    norm = server.normalization
    out["normalization"] = None if norm is None else {"mean": norm.mean, "std": norm.std}
    out["config"] = {
        "max_batch_size": server.config.max_batch_size,
        "max_wait_ms": server.config.max_wait_ms,
        "max_items_per_request": server.config.max_items_per_request,
    }
    return out


# ----------------------------------------------------------------------------------------------------------
# Errors outside the scoring routes, and the app


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return _error_response(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own 422 body replaced by the server's: ``{"error": {"code", "message"}}`` naming the field
    (a scoring route answers its errors itself; this covers any other)."""
    error = schemas.request_error_of(exc.errors())
    return _error_response(error.status, error.code, error.message)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.error("unhandled error on %s", request.url.path, exc_info=exc)
    return _error_response(500, "internal_error", "internal server error")


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Starts the batching worker with the app, and stops it (failing what is queued) on shutdown."""
    server: _Server = app.state.server
    batcher = _Batcher(server.scorer, server.config)
    batcher.start()
    app.state.batcher = batcher
    logger.info(
        "reward server ready: max_batch_size=%d max_wait_ms=%g normalization=%s auth=%s",
        server.config.max_batch_size,
        server.config.max_wait_ms,
        "on" if server.normalization else "off",
        "on" if server.expected_auth else "off",
    )
    try:
        yield
    finally:
        await batcher.close()


def _server_of(scorer: Scorer, config: ServeConfig) -> _Server:
    folder = config.model_dir or getattr(scorer, "model_dir", None)
    return _Server(
        scorer=scorer,
        config=config,
        normalization=_resolve_normalization(scorer, config),
        limits=schemas.RequestLimits(config.max_items_per_request, config.text_limit(scorer)),
        breakdown_keys=formats.breakdown_keys(scorer),
        categories=list(getattr(scorer, "categories", None) or []) or None,
        model_name=Path(folder).name if folder else type(scorer).__name__,
        expected_auth=f"Bearer {config.token}".encode() if config.token else None,
    )


def create_app(scorer: Scorer, config: ServeConfig | None = None) -> FastAPI:
    """Build the ASGI app serving ``scorer``; the batching worker starts with the app's lifespan.

    The normalization file (if any, and if ``config.normalize``) is read here, once.
    """
    config = config or ServeConfig()
    if not hasattr(scorer, "score") or not hasattr(scorer, "score_texts"):
        raise TypeError(
            f"scorer: {type(scorer).__name__} does not implement the Scorer protocol (score, score_texts)"
        )
    server = _server_of(scorer, config)
    app = FastAPI(
        title="dmoerm reward server", lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.config = config
    app.state.normalization = server.normalization
    app.state.server = server
    app.include_router(scoring_routes)
    app.include_router(status_routes)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)
    return app
