"""The reward server's settings: :class:`ServeConfig` (any scorer) and :class:`ServeModelConfig` (``dmoerm serve``:
a model directory and where to listen). Every field is checked when a config is built; the message names it."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ServeConfig", "ServeModelConfig"]


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
