"""A judge behind any OpenAI-compatible chat-completions API (OpenAI, DeepSeek, Qwen/DashScope, vLLM, Ollama,
llama.cpp server, ...).

Requests are async (``httpx.AsyncClient``) with a concurrency limit and a rate limit; 429, 5xx, timeouts
and connection errors are retried with exponential backoff and jitter (``Retry-After`` honoured) and counted
per kind; malformed answers are re-asked up to ``malformed_retries`` times, then counted and skipped. Every
answer is committed to the :class:`~dmoerm.labelling.cache.JudgeCache` as it arrives. The API key is read
from an environment variable whose *name* is configured, kept only in the request header, and never
written to the cache, the labels, the identity or the logs.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import os
import random
import time
from collections.abc import Sequence

import httpx

from dmoerm.labelling.cache import JudgeCache, request_key
from dmoerm.labelling.judge import Judge, JudgeError, JudgeRequest, JudgeStats, Verdict
from dmoerm.labelling.prompts import TIE, PromptBuilder

logger = logging.getLogger(__name__)

MODES = ("pairwise", "json")


class _Retryable(Exception):
    def __init__(self, kind: str, retry_after: float | None = None, detail: str = ""):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.retry_after = retry_after


def _retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds: either a number or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class OpenAIJudge(Judge):
    """A judge that asks an OpenAI-compatible ``/chat/completions`` endpoint.

    Args:
        model: the served model name.
        base_url: the API root, e.g. ``https://api.openai.com/v1``, ``http://127.0.0.1:8000/v1`` (vLLM),
            ``http://127.0.0.1:11434/v1`` (Ollama).
        api_key_env: name of the environment variable that holds the key; None (or an unset variable for a
            local server) sends no Authorization header.
        mode: ``pairwise`` (one call per capability point and order, the paper's protocol) or ``json`` (one
            call per order for all points of the category, answered as JSON).
        cache: where answers are stored; None keeps nothing between runs.
        concurrency: requests in flight at most.
        requests_per_second: request starts per second at most; None for no limit.
        timeout_s: per-request timeout (connect, read, write, pool).
        max_retries: retries per request for 429 / 5xx / timeouts / connection errors.
        backoff_base_s, backoff_max_s: exponential backoff ``min(max, base * 2**attempt)`` with jitter
            (half fixed, half random); a ``Retry-After`` header replaces it (capped at ``retry_after_max_s``).
        malformed_retries: re-asks when an answer cannot be parsed; then the question is skipped.
        temperature, max_tokens: sampling parameters (part of the cache identity).
        logprobs: ask for the answer token's top log-probabilities (OpenAI, vLLM, llama.cpp support it); it
            gives probabilities and margins, so the margin calibration applies to API judges too.
        price_prompt_per_m, price_completion_per_m: prices per 1M prompt/completion tokens, for the cost.
        extra_body: extra JSON fields sent with every request (e.g. ``{"seed": 0}``); part of the identity.
        prompts: the prompt builder (answer labels, truncation).
    """

    supports_json = True

    def __init__(
        self,
        model: str,
        base_url: str = "https://api.openai.com/v1",
        *,
        api_key_env: str | None = "OPENAI_API_KEY",
        mode: str = "pairwise",
        cache: JudgeCache | None = None,
        concurrency: int = 8,
        requests_per_second: float | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 6,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
        retry_after_max_s: float = 300.0,
        malformed_retries: int = 2,
        temperature: float = 0.0,
        max_tokens: int | None = None,
        logprobs: bool = False,
        price_prompt_per_m: float = 0.0,
        price_completion_per_m: float = 0.0,
        extra_body: dict | None = None,
        prompts: PromptBuilder | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"mode: {mode!r} is not one of {', '.join(MODES)}")
        if concurrency < 1:
            raise ValueError(f"concurrency: {concurrency} must be at least 1")
        if requests_per_second is not None and requests_per_second <= 0:
            raise ValueError(f"requests_per_second: {requests_per_second} must be > 0 (or None for no limit)")
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.mode = mode
        self.cache = cache
        self.concurrency = concurrency
        self.requests_per_second = requests_per_second
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.retry_after_max_s = retry_after_max_s
        self.malformed_retries = malformed_retries
        self.temperature = temperature
        self.max_tokens = max_tokens if max_tokens is not None else (16 if mode == "pairwise" else 512)
        self.logprobs = logprobs
        self.price_prompt_per_m = price_prompt_per_m
        self.price_completion_per_m = price_completion_per_m
        self.extra_body = dict(extra_body or {})
        self.prompts = prompts or PromptBuilder()
        self.stats = JudgeStats()
        self.name = f"openai:{model}"
        self.max_inflight_calls = max(2, concurrency * 2)
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._sem: asyncio.Semaphore | None = None
        self._rate_lock: asyncio.Lock | None = None
        self._next_start = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[str, asyncio.Future] = {}
        """Cache key -> the answer of the identical question now in flight (asked once, shared)."""

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIJudge(model={self.model!r}, base_url={self.base_url!r}, mode={self.mode!r})"

    @property
    def identity(self) -> str:
        params = {
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "logprobs": self.logprobs,
            "extra_body": self.extra_body,
            "prompts": self.prompts.identity(),
        }
        return f"openai|{self.base_url}|{self.model}|{json.dumps(params, sort_keys=True)}"

    # ------------------------------------------------------------------------------------------ transport

    def _ensure_client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            headers = {"Content-Type": "application/json"}
            key = os.environ.get(self.api_key_env) if self.api_key_env else None
            if key:
                headers["Authorization"] = f"Bearer {key}"
            elif self.api_key_env:
                logger.info("%s is not set; sending requests without an API key", self.api_key_env)
            limits = httpx.Limits(
                max_connections=self.concurrency, max_keepalive_connections=self.concurrency
            )
            self._client = httpx.AsyncClient(
                base_url=self.base_url,
                headers=headers,
                timeout=httpx.Timeout(self.timeout_s),
                limits=limits,
                transport=self._transport,
            )
            self._sem = asyncio.Semaphore(self.concurrency)
            self._rate_lock = asyncio.Lock()
            self._pending = {}
            self._loop = loop
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            try:
                await self._client.aclose()
            except RuntimeError:  # the loop that opened it is gone
                pass
            self._client = None

    async def _throttle(self) -> None:
        if not self.requests_per_second:
            return
        assert self._rate_lock is not None
        async with self._rate_lock:
            now = time.monotonic()
            wait = self._next_start - now
            self._next_start = max(now, self._next_start) + 1.0 / self.requests_per_second
        if wait > 0:
            await asyncio.sleep(wait)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.retry_after_max_s)
        d = min(self.backoff_max_s, self.backoff_base_s * (2**attempt))
        return d / 2 + random.uniform(0, d / 2)

    async def _post_once(self, body: dict) -> dict:
        client = self._ensure_client()
        await self._throttle()
        try:
            resp = await client.post("/chat/completions", json=body)
        except httpx.TimeoutException as e:
            raise _Retryable("timeout", detail=type(e).__name__) from None
        except httpx.TransportError as e:
            raise _Retryable("connection", detail=type(e).__name__) from None
        if resp.status_code == 429:
            raise _Retryable("rate_limit", _retry_after_seconds(resp.headers.get("retry-after")), "HTTP 429")
        if resp.status_code >= 500:
            raise _Retryable(
                "server_error",
                _retry_after_seconds(resp.headers.get("retry-after")),
                f"HTTP {resp.status_code}",
            )
        if resp.status_code >= 400:
            raise JudgeError(
                f"{self.base_url}/chat/completions answered HTTP {resp.status_code} for model {self.model!r}: "
                f"{resp.text[:300]!s} (check base_url, model and the key in ${self.api_key_env})"
            )
        try:
            return resp.json()
        except ValueError:
            raise _Retryable("server_error", detail="response is not JSON") from None

    async def _post(self, body: dict) -> dict:
        """POST with retries; raises :class:`_Retryable` when retries are exhausted."""
        self._ensure_client()
        assert self._sem is not None
        attempt = 0
        while True:
            async with self._sem:
                try:
                    return await self._post_once(body)
                except _Retryable as e:
                    if attempt >= self.max_retries:
                        raise
                    delay = self._backoff(attempt, e.retry_after)
                    self.stats.retries[e.kind] += 1
                    logger.debug("retrying after %s (attempt %d, sleeping %.3fs)", e.kind, attempt + 1, delay)
            attempt += 1
            await asyncio.sleep(delay)

    def _count_usage(self, data: dict) -> None:
        usage = data.get("usage") or {}
        pt = int(usage.get("prompt_tokens") or 0)
        ct = int(usage.get("completion_tokens") or 0)
        self.stats.prompt_tokens += pt
        self.stats.completion_tokens += ct
        self.stats.cost += pt * self.price_prompt_per_m / 1e6 + ct * self.price_completion_per_m / 1e6

    # ------------------------------------------------------------------------------------------- asking

    def _body(self, messages: list[dict]) -> dict:
        body = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            **self.extra_body,
        }
        if self.logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = 10
        return body

    async def _ask(self, messages: list[dict], parse, expected: int = 1) -> tuple[object, dict, bool]:
        """Ask one prompt (cache first). Returns (parsed or None, payload, cached).

        A prompt identical to one in flight is not sent again: it waits for that answer (counted ``cached``
        and ``shared``), so duplicate questions reach the server once even before the cache has the answer.
        """
        key = request_key(self.identity, messages)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self.stats.cached += 1
                return (parse(hit["raw"]) if "raw" in hit else None), hit, True
        pending = self._pending.get(key)
        if pending is not None:
            parsed, payload = await asyncio.shield(pending)  # shield: a cancelled waiter leaves the asker be
            if "error" in payload:  # the shared request failed: so did this question (not cached)
                self.stats.failed += expected
                return parsed, payload, False
            self.stats.cached += 1
            self.stats.shared += 1
            return parsed, payload, True
        fut = asyncio.get_running_loop().create_future()
        self._pending[key] = fut
        try:
            result = await self._ask_server(key, messages, parse, expected)
        except Exception as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        except BaseException:  # cancelled: so are the questions waiting for this one
            fut.cancel()
            raise
        finally:
            self._pending.pop(key, None)
        fut.set_result(result)
        return (*result, False)

    async def _ask_server(self, key: str, messages: list[dict], parse, expected: int) -> tuple[object, dict]:
        """Send one prompt (re-asking malformed answers) and cache the answer. Returns (parsed or None, payload).

        ``parse(raw)`` returns the parsed answer (a choice, or a dict of choices in JSON mode) or a falsy
        value; an answer is complete when it has ``expected`` entries (dicts) or is truthy. Incomplete answers
        are re-asked ``malformed_retries`` times; the most complete one is kept.
        """

        def size(p: object) -> int:
            return (len(p) if isinstance(p, dict) else 1) if p else 0

        body = self._body(messages)
        best: tuple[object, dict] = (None, {})
        for attempt in range(self.malformed_retries + 1):
            try:
                data = await self._post(body)
            except _Retryable as e:
                self.stats.failed += expected
                logger.warning("request failed after %d retries: %s", self.max_retries, e)
                return None, {"error": f"failed: {e.kind}"}
            self._count_usage(data)
            try:
                choice = data["choices"][0]
                raw = choice["message"].get("content") or ""
            except (KeyError, IndexError, TypeError, AttributeError):
                choice, raw = {}, ""
            parsed = parse(raw)
            if best[0] is None or size(parsed) > size(best[0]):
                best = (parsed, {"raw": raw, "usage": data.get("usage"), "logprobs": _top_logprobs(choice)})
            if size(parsed) >= expected:
                break
            if attempt < self.malformed_retries:
                self.stats.retries["malformed"] += 1
                logger.debug("malformed answer %r; asking again", raw[:200])
        parsed, payload = best
        self.stats.asked += 1
        missing = expected - size(parsed)
        if missing > 0:
            self.stats.malformed += missing
            payload["malformed"] = True
        if self.cache is not None:
            self.cache.put(key, self.name, payload)
        return parsed, payload

    def _probabilities(self, payload: dict, choice: str) -> tuple[float, float | None]:
        """(p_first, margin) from the answer token's top log-probabilities, else hard from the choice."""
        top = payload.get("logprobs") or []
        l1, l2 = self.prompts.labels
        lp = {}
        for tok, logp in top:
            t = tok.strip().strip("\"'*").upper()
            for pos, lab in (("1", l1), ("2", l2)):
                if t == lab.upper() and pos not in lp:
                    lp[pos] = logp
        if choice in ("1", "2") and lp:
            floor = min(lp2 for _, lp2 in top) - 1.0 if top else -30.0
            a, b = lp.get("1", floor), lp.get("2", floor)
            margin = a - b
            return 1.0 / (1.0 + math.exp(-margin)), margin
        return {"1": 1.0, "2": 0.0}.get(choice, 0.5), None

    async def _judge_one(self, req: JudgeRequest) -> list[Verdict]:
        caps = req.capabilities
        if self.mode == "json":
            parts = self.prompts.all_capabilities(
                req.conversation, req.first, req.second, req.category, caps, req.language
            )
            parsed, payload, cached = await self._ask(
                parts.messages(0), lambda raw: self.prompts.parse_json(raw, caps), expected=len(caps)
            )
            raw = payload.get("raw", "")
            out = []
            for c in caps:
                ch = (parsed or {}).get(c.name)
                err = payload.get("error") or (None if ch else "malformed")
                p = {"1": 1.0, "2": 0.0, TIE: 0.5}.get(ch or "", None)
                out.append(Verdict(c.name, ch, p, None, raw, cached, err))
            return out
        parts = self.prompts.pairwise(
            req.conversation, req.first, req.second, req.category, caps, req.language
        )
        results = await asyncio.gather(
            *(self._ask(parts.messages(i), self.prompts.parse_choice) for i in range(len(caps)))
        )
        out = []
        for c, (ch, payload, cached) in zip(caps, results, strict=True):
            if ch is None:
                out.append(Verdict(c.name, None, None, None, payload.get("raw", ""), cached,
                                   payload.get("error") or "malformed"))  # fmt: skip
                continue
            p, margin = self._probabilities(payload, ch)
            out.append(Verdict(c.name, ch, p, margin, payload.get("raw", ""), cached))
        return out

    async def judge(self, requests: Sequence[JudgeRequest]) -> list[list[Verdict]]:
        self._ensure_client()
        return list(await asyncio.gather(*(self._judge_one(r) for r in requests)))


def _top_logprobs(choice: dict) -> list[tuple[str, float]]:
    """[(token, logprob)] of the first generated token, from an OpenAI-style ``logprobs`` field."""
    try:
        content = choice["logprobs"]["content"]
    except (KeyError, TypeError):
        return []
    if not content:
        return []
    first = content[0]
    top = first.get("top_logprobs") or [
        {"token": first.get("token", ""), "logprob": first.get("logprob", 0.0)}
    ]
    return [(t.get("token", ""), float(t.get("logprob", -1e9))) for t in top if isinstance(t, dict)]
