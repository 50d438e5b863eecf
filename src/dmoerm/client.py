"""HTTP clients (sync and async) for the dmoerm reward server (:mod:`dmoerm.serving`).

Both retry connection errors and 5xx answers with exponential back-off, split requests larger than
``max_items_per_request``, and raise :class:`RewardServerError` for anything the server refuses (4xx) or
keeps failing on.

Example::

    with RewardClient("http://127.0.0.1:8000", token="...") as client:
        rewards = client.get_reward(["<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello!<|im_end|>"])
        outputs = client.score([[{"role": "user", "content": "Hi"}]], ["Hello!"])
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from dmoerm.data import Message
from dmoerm.outputs import RewardOutput

logger = logging.getLogger(__name__)

__all__ = ["AsyncRewardClient", "RewardClient", "RewardServerError"]

_RETRY_STATUS = frozenset({500, 502, 503, 504})


class RewardServerError(RuntimeError):
    """The server refused a request or kept failing; ``status_code`` is None for connection failures."""

    def __init__(self, message: str, status_code: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code


def _message_dict(turn: Message | Mapping[str, Any]) -> dict[str, str]:
    if isinstance(turn, Message):
        return {"role": turn.role, "content": turn.content}
    return {"role": str(turn["role"]), "content": turn["content"]}


def _score_payload(
    conversations: Sequence[Sequence[Message | Mapping[str, Any]]], responses: Sequence[str], normalize: bool
) -> dict[str, Any]:
    return {
        "items": [
            {"conversation": [_message_dict(t) for t in conv], "response": resp}
            for conv, resp in zip(conversations, responses, strict=True)
        ],
        "normalize": normalize,
    }


def _float(x: Any) -> float:
    return float("nan") if x is None else float(x)


def _parse_score(data: Any, n: int) -> list[RewardOutput]:
    results = data["results"]
    if len(results) != n:
        raise RewardServerError(f"server returned {len(results)} results for {n} items")
    return [
        RewardOutput(
            reward=_float(r["reward"]),
            category=r.get("category"),
            category_probability=None
            if r.get("category_probability") is None
            else float(r["category_probability"]),
            capability_scores={k: _float(v) for k, v in (r.get("capability_scores") or {}).items()},
        )
        for r in results
    ]


def _parse_rewards(data: Any, n: int) -> list[float]:
    rewards = data["rewards"]
    if len(rewards) != n:
        raise RewardServerError(f"server returned {len(rewards)} rewards for {n} texts")
    return [_float(r) for r in rewards]


def _error_from(response: httpx.Response) -> RewardServerError:
    code, message = None, response.text[:500]
    try:
        err = response.json().get("error", {})
        code, message = err.get("code"), err.get("message", message)
    except (ValueError, AttributeError):
        pass
    return RewardServerError(
        f"HTTP {response.status_code}: {message}", status_code=response.status_code, code=code
    )


def _check_lengths(conversations: Sequence[Any], responses: Sequence[str]) -> None:
    if len(conversations) != len(responses):
        raise ValueError(f"responses: {len(responses)} responses for {len(conversations)} conversations")


class _Base:
    def __init__(
        self,
        base_url: str,
        token: str | None,
        timeout: float,
        connect_timeout: float,
        retries: int,
        backoff_s: float,
        max_items_per_request: int,
    ) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"base_url: expected an http(s) URL such as http://127.0.0.1:8000, got {base_url!r}"
            )
        if retries < 0:
            raise ValueError(f"retries: must be >= 0, got {retries}")
        if max_items_per_request < 1:
            raise ValueError(f"max_items_per_request: must be >= 1, got {max_items_per_request}")
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_items_per_request = max_items_per_request
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = httpx.Timeout(timeout, connect=connect_timeout)

    def __repr__(self) -> str:  # never shows the token
        return f"{type(self).__name__}({self.base_url!r})"

    def _chunks(self, n: int) -> list[tuple[int, int]]:
        step = self.max_items_per_request
        return [(i, min(i + step, n)) for i in range(0, n, step)]

    def _should_retry(self, attempt: int, status: int | None) -> bool:
        return attempt < self.retries and (status is None or status in _RETRY_STATUS)

    def _delay(self, attempt: int) -> float:
        return self.backoff_s * (2**attempt)


class RewardClient(_Base):
    """Synchronous client. Use as a context manager or call :meth:`close`.

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:8000``.
        token: bearer token, if the server requires one.
        timeout: seconds to wait for an answer (read/write/pool); ``connect_timeout`` for the connection.
        retries: extra attempts after a connection error or a 5xx answer (4xx is never retried).
        backoff_s: the first retry waits this long; each next one twice as long.
        max_items_per_request: larger calls are split into several requests (the server caps items per
            request, 512 by default).
        transport: an httpx transport (tests, proxies).
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float = 120.0,
        connect_timeout: float = 10.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        max_items_per_request: int = 256,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, token, timeout, connect_timeout, retries, backoff_s, max_items_per_request)
        self._client = httpx.Client(
            base_url=self.base_url, headers=self._headers, timeout=self._timeout, transport=transport
        )

    def _request(self, method: str, path: str, json: Any = None) -> Any:
        attempt = 0
        while True:
            try:
                response = self._client.request(method, path, json=json)
            except httpx.TransportError as exc:
                if not self._should_retry(attempt, None):
                    raise RewardServerError(f"cannot reach {self.base_url}{path}: {exc!r}") from exc
                logger.warning("reward server %s%s: %r; retrying", self.base_url, path, exc)
            else:
                if response.status_code < 400:
                    return response.json()
                if not self._should_retry(attempt, response.status_code):
                    raise _error_from(response)
                logger.warning(
                    "reward server %s%s: HTTP %d; retrying", self.base_url, path, response.status_code
                )
            time.sleep(self._delay(attempt))
            attempt += 1

    def get_reward(self, texts: Sequence[str], *, normalize: bool = True) -> list[float]:
        """Rewards of rendered prompt+response strings (``POST /get_reward``)."""
        out: list[float] = []
        for a, b in self._chunks(len(texts)):
            data = self._request("POST", "/get_reward", {"query": list(texts[a:b]), "normalize": normalize})
            out.extend(_parse_rewards(data, b - a))
        return out

    def score(
        self,
        conversations: Sequence[Sequence[Message | Mapping[str, Any]]],
        responses: Sequence[str],
        *,
        normalize: bool = True,
    ) -> list[RewardOutput]:
        """Reward, category and capability scores of each response (``POST /score``)."""
        _check_lengths(conversations, responses)
        out: list[RewardOutput] = []
        for a, b in self._chunks(len(responses)):
            data = self._request(
                "POST", "/score", _score_payload(conversations[a:b], responses[a:b], normalize)
            )
            out.extend(_parse_score(data, b - a))
        return out

    def health(self) -> dict[str, Any]:
        """``GET /health``."""
        return self._request("GET", "/health")

    def stats(self) -> dict[str, Any]:
        """``GET /stats``."""
        return self._request("GET", "/stats")

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncRewardClient(_Base):
    """Asynchronous client (same methods as :class:`RewardClient`, awaitable)."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float = 120.0,
        connect_timeout: float = 10.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        max_items_per_request: int = 256,
        max_connections: int = 64,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, token, timeout, connect_timeout, retries, backoff_s, max_items_per_request)
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=self._headers,
            timeout=self._timeout,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
        )

    async def _request(self, method: str, path: str, json: Any = None) -> Any:
        attempt = 0
        while True:
            try:
                response = await self._client.request(method, path, json=json)
            except httpx.TransportError as exc:
                if not self._should_retry(attempt, None):
                    raise RewardServerError(f"cannot reach {self.base_url}{path}: {exc!r}") from exc
                logger.warning("reward server %s%s: %r; retrying", self.base_url, path, exc)
            else:
                if response.status_code < 400:
                    return response.json()
                if not self._should_retry(attempt, response.status_code):
                    raise _error_from(response)
                logger.warning(
                    "reward server %s%s: HTTP %d; retrying", self.base_url, path, response.status_code
                )
            await asyncio.sleep(self._delay(attempt))
            attempt += 1

    async def get_reward(self, texts: Sequence[str], *, normalize: bool = True) -> list[float]:
        """Rewards of rendered prompt+response strings (``POST /get_reward``); chunks are sent concurrently."""
        chunks = self._chunks(len(texts))
        datas = await asyncio.gather(
            *(
                self._request("POST", "/get_reward", {"query": list(texts[a:b]), "normalize": normalize})
                for a, b in chunks
            )
        )
        out: list[float] = []
        for (a, b), data in zip(chunks, datas, strict=True):
            out.extend(_parse_rewards(data, b - a))
        return out

    async def score(
        self,
        conversations: Sequence[Sequence[Message | Mapping[str, Any]]],
        responses: Sequence[str],
        *,
        normalize: bool = True,
    ) -> list[RewardOutput]:
        """Reward, category and capability scores of each response (``POST /score``)."""
        _check_lengths(conversations, responses)
        chunks = self._chunks(len(responses))
        datas = await asyncio.gather(
            *(
                self._request("POST", "/score", _score_payload(conversations[a:b], responses[a:b], normalize))
                for a, b in chunks
            )
        )
        out: list[RewardOutput] = []
        for (a, b), data in zip(chunks, datas, strict=True):
            out.extend(_parse_score(data, b - a))
        return out

    async def health(self) -> dict[str, Any]:
        """``GET /health``."""
        return await self._request("GET", "/health")

    async def stats(self) -> dict[str, Any]:
        """``GET /stats``."""
        return await self._request("GET", "/stats")

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
