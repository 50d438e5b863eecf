"""The reward server's micro-batcher: concurrent requests' items merged into one scorer call.

One worker coroutine drains a queue until it holds ``max_batch_size`` items or ``max_wait_ms`` passed, runs the
scorer in a dedicated thread (the event loop keeps serving) and resolves each request's future. A job whose
client went away (its future cancelled) is dropped from the queue, or its result discarded if it was already
being scored. A batch that fails is retried request by request, so one bad input fails only its own request.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from dmoerm.data import Message
from dmoerm.outputs import RewardOutput, Scorer
from dmoerm.serving import formats
from dmoerm.serving.config import ServeConfig

logger = logging.getLogger(__name__)


class _ScorerFailedError(RuntimeError):
    """The scorer raised something other than a ValueError (already logged; answered with a generic 500)."""


class _ServerBusyError(RuntimeError):
    """The queue is full or the server is shutting down (answered 503)."""


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


def _split_back(values: Sequence, jobs: Sequence[_Job], out: dict[int, list]) -> None:
    """Each job's share of one merged scorer call, in job order: ``out[id(job)]``."""
    start = 0
    for j in jobs:
        out[id(j)] = values[start : start + len(j)]
        start += len(j)


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
            _split_back(rewards, text_jobs, out)
        if item_jobs:
            convs = [c for j in item_jobs for c in j.conversations]
            resps = [r for j in item_jobs for r in j.responses]
            outputs = list(self.scorer.score(convs, resps, batch_size=batch_size))
            if len(outputs) != len(resps):
                raise RuntimeError(f"scorer returned {len(outputs)} outputs for {len(resps)} items")
            _split_back(outputs, item_jobs, out)
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
