"""Judge configurations: an API judge and a local judge, each with only its own options, and :func:`make_judge`.

* :class:`ApiJudgeConfig` describes an :class:`~dmoerm.labelling.api.OpenAIJudge` (any OpenAI-compatible API);
* :class:`LocalJudgeConfig` describes a :class:`~dmoerm.labelling.local.LocalJudge` (a Hugging Face causal LM
  read through its answer-token logits);
* :class:`JudgeConfig` is the flat option set of the commands (``dmoerm label``, ``label-quality``,
  ``eval-judge``) and of the pipeline's ``labels.judge`` section: ``backend`` selects the judge, every option
  keeps its one name (``--concurrency``, ``--dtype``, ...), and :meth:`JudgeConfig.judge_config` gives the typed
  configuration of the selected judge.

:func:`make_judge` picks the judge by the configuration's type. Every option is validated on creation; a bad
value raises ``ValueError("<field>: <value> ...; <what is allowed>")``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from dmoerm.labelling.api import MODES
from dmoerm.labelling.judge import Judge
from dmoerm.labelling.local import DTYPES
from dmoerm.labelling.prompts import LANGUAGES

BACKENDS = ("local", "openai")
"""``local``: :class:`LocalJudgeConfig`; ``openai``: :class:`ApiJudgeConfig`."""
ANSWER_LABELS = ("12", "AB")
"""How the two positions are named in prompts: "1"/"2" or "A"/"B"."""
DEVICES = ("cpu", "cuda", "cuda:N", "mps", "auto")


def _bad(name: str, msg: str) -> None:
    raise ValueError(f"{name}: {msg}")


def _one_of(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        _bad(name, f"{value!r} is not one of {', '.join(allowed)}")


def _at_least(name: str, value: float, low: float, strict: bool = False) -> None:
    if value < low or (strict and value == low):
        _bad(name, f"{value} must be {'>' if strict else '>='} {low:g}")


@dataclass(kw_only=True)
class JudgeBase:
    """What every judge configuration has: the model, the answer cache, how positions are named."""

    model: str | None = None
    """Local: folder/hub id, None for the bundled SmolLM2-135M-Instruct. API: the served model name."""
    cache: str | None = None
    """SQLite judge cache; None for the command's default path (beside its output). In an
    :class:`ApiJudgeConfig` or :class:`LocalJudgeConfig`, None keeps the answers in memory only."""
    answer_labels: str = "12"
    """How positions are named in prompts: ``12`` ("1"/"2") or ``AB`` ("A"/"B")."""

    def _check_base(self) -> None:
        if self.cache is not None and not str(self.cache).strip():
            _bad("cache", "empty; give a SQLite file path or leave it unset for the default")
        _one_of("answer_labels", self.answer_labels, ANSWER_LABELS)


@dataclass(kw_only=True)
class _ApiOptions:
    """The options of a judge behind an OpenAI-compatible API (see :class:`ApiJudgeConfig`)."""

    base_url: str = "https://api.openai.com/v1"
    """API root of an OpenAI-compatible server (vLLM ``http://127.0.0.1:8000/v1``, Ollama ``.../11434/v1``)."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """Name of the environment variable holding the API key (the key itself is never configured)."""
    mode: str = "pairwise"
    """``pairwise``: one question per capability point and order (paper). ``json``: all points of the category
    in one call per order with a JSON answer (API backend only)."""
    concurrency: int = 8
    """API: requests in flight at most."""
    requests_per_second: float | None = None
    """API: request starts per second at most; None for no limit."""
    timeout_s: float = 60.0
    """API: per-request timeout in seconds."""
    max_retries: int = 6
    """API: retries per request for 429, 5xx, timeouts and connection errors."""
    backoff_base_s: float = 1.0
    """API: first backoff in seconds (doubles per retry up to ``backoff_max_s``, with jitter; a
    ``Retry-After`` header wins)."""
    backoff_max_s: float = 60.0
    """API: longest backoff in seconds."""
    malformed_retries: int = 2
    """API: re-asks of an unparseable answer before it is counted as malformed and skipped."""
    temperature: float = 0.0
    """API: sampling temperature."""
    logprobs: bool = False
    """API: request top log-probabilities of the answer token (enables margin calibration)."""
    price_prompt_per_m: float = 0.0
    """API: price per 1M prompt tokens, for the reported cost."""
    price_completion_per_m: float = 0.0
    """API: price per 1M completion tokens."""

    def _check_api(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            _bad("base_url", f"{self.base_url!r} must start with http:// or https://")
        _one_of("mode", self.mode, MODES)
        _at_least("concurrency", self.concurrency, 1)
        if self.requests_per_second is not None and self.requests_per_second <= 0:
            _bad("requests_per_second", f"{self.requests_per_second} must be > 0 (or None for no limit)")
        _at_least("timeout_s", self.timeout_s, 0, strict=True)
        for name in ("max_retries", "malformed_retries", "backoff_base_s", "temperature"):
            _at_least(name, getattr(self, name), 0)
        if self.backoff_max_s < self.backoff_base_s:
            _bad("backoff_max_s", f"{self.backoff_max_s} must be >= backoff_base_s ({self.backoff_base_s})")
        for name in ("price_prompt_per_m", "price_completion_per_m"):
            _at_least(name, getattr(self, name), 0)
        if self.api_key_env is not None and not self.api_key_env.replace("_", "").isalnum():
            _bad(
                "api_key_env",
                f"{self.api_key_env!r} must be the NAME of an environment variable, not the key",
            )


@dataclass(kw_only=True)
class _LocalOptions:
    """The options of a local Hugging Face judge (see :class:`LocalJudgeConfig`)."""

    device: str = "cpu"
    """Local: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``."""
    dtype: str = "bfloat16"
    """Local: ``float32``, ``bfloat16``, ``float16``."""
    batch_size: int = 8
    """Local: rows per forward pass."""
    reuse_prefix: bool = True
    """Local: reuse the key/value cache of the shared prefix across capability questions."""
    max_length: int = 4096
    """Local: token limit of one prompt; longer prompts lose tokens from the middle."""

    def _check_local(self) -> None:
        if not (self.device in ("cpu", "cuda", "auto", "mps") or self.device.startswith("cuda:")):
            _bad("device", f"{self.device!r} is not one of {', '.join(DEVICES)}")
        _one_of("dtype", self.dtype, DTYPES)
        _at_least("batch_size", self.batch_size, 1)
        if self.max_length < 64:
            _bad("max_length", f"{self.max_length} is too small for a judge prompt; use 1024 or more")


@dataclass(kw_only=True)
class ApiJudgeConfig(_ApiOptions, JudgeBase):
    """A judge behind any OpenAI-compatible chat-completions API (:class:`~dmoerm.labelling.api.OpenAIJudge`).

    ``model`` (the served model name) is required; the key is read from ``$<api_key_env>`` when requests are
    sent, never stored here.
    """

    def __post_init__(self) -> None:
        if not self.model:
            _bad("model", "the openai backend needs the served model name (e.g. gpt-4o-mini, deepseek-chat)")
        self._check_base()
        self._check_api()


@dataclass(kw_only=True)
class LocalJudgeConfig(_LocalOptions, JudgeBase):
    """A local Hugging Face causal LM read through its answer-token logits
    (:class:`~dmoerm.labelling.local.LocalJudge`); ``model`` None is the bundled SmolLM2-135M-Instruct."""

    def __post_init__(self) -> None:
        self._check_base()
        self._check_local()


@dataclass(kw_only=True)
class JudgeConfig(_LocalOptions, _ApiOptions, JudgeBase):
    """The judge options that ``dmoerm label`` (:class:`~dmoerm.labelling.pipeline.LabelConfig`), ``dmoerm
    label-quality`` (:class:`~dmoerm.labelling.quality.QualityConfig`) and ``dmoerm eval-judge`` share: every
    option of both judges, one selected by ``backend`` (:meth:`judge_config`), plus the prompt language, the
    margin rule's threshold and the progress bar.

    Every field is validated on creation, the options of the judge not selected too (a typo is an error
    whichever backend runs); a bad value raises ``ValueError("<field>: <what is wrong>; <fix>")``.
    """

    backend: str = "local"
    """``local`` (a Hugging Face causal LM, logits) or ``openai`` (any OpenAI-compatible API)."""
    min_margin: float = 0.0
    """Margin rule: drop labels whose calibrated log-odds are below this."""
    language: str = "auto"
    """Prompt language: ``auto`` (from the conversation's script), ``en`` or ``zh``."""
    progress: bool = True
    """Show a progress bar with ETA."""

    def __post_init__(self) -> None:
        _one_of("backend", self.backend, BACKENDS)
        if self.backend == "openai" and not self.model:
            _bad("model", "the openai backend needs the served model name (e.g. gpt-4o-mini, deepseek-chat)")
        self._check_base()
        self._check_api()
        if self.mode == "json" and self.backend != "openai":
            _bad("mode", "json mode needs backend=openai; the local judge reads logits per capability point")
        _at_least("min_margin", self.min_margin, 0)
        _one_of("language", self.language, ("auto", *LANGUAGES))
        self._check_local()

    @classmethod
    def from_namespace(cls, ns: object):
        """From an ``argparse.Namespace`` (attributes named like the fields; missing or None ones take
        defaults)."""
        from dataclasses import MISSING

        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        given = {k: v for k, v in vars(ns).items() if k in names and (v is not None or k in required)}
        return cls(**given)

    def cache_path(self) -> str:
        """The judge cache file (subclasses give the default)."""
        if self.cache is None:
            raise ValueError(
                "cache: no judge cache path configured; give a SQLite file (or ':memory:' to keep the answers "
                "in memory only)"
            )
        return self.cache

    def judge_config(self) -> ApiJudgeConfig | LocalJudgeConfig:
        """The typed configuration of the judge ``backend`` selects, with the cache at :meth:`cache_path`."""
        cls = ApiJudgeConfig if self.backend == "openai" else LocalJudgeConfig
        values = {f.name: getattr(self, f.name) for f in fields(cls)}
        values["cache"] = self.cache_path()
        return cls(**values)


def make_judge(cfg: ApiJudgeConfig | LocalJudgeConfig | JudgeConfig) -> Judge:
    """The judge (with its SQLite cache at ``cfg.cache``) that a configuration describes, picked by its type
    (a :class:`JudgeConfig` by its ``backend``).

    Nothing is loaded here: a local judge loads its model on first use, an API judge opens its connections on
    its first request. The API key is read from ``$<api_key_env>`` when requests are sent.
    """
    if isinstance(cfg, JudgeConfig):
        cfg = cfg.judge_config()
    if isinstance(cfg, ApiJudgeConfig):
        return _api_judge(cfg)
    if isinstance(cfg, LocalJudgeConfig):
        return _local_judge(cfg)
    raise TypeError(
        f"cfg: expected an ApiJudgeConfig, LocalJudgeConfig or JudgeConfig, got {type(cfg).__name__}"
    )


def _api_judge(cfg: ApiJudgeConfig) -> Judge:
    from dmoerm.labelling.api import OpenAIJudge
    from dmoerm.labelling.cache import JudgeCache
    from dmoerm.labelling.prompts import PromptBuilder

    return OpenAIJudge(
        cfg.model or "",
        cfg.base_url,
        api_key_env=cfg.api_key_env,
        mode=cfg.mode,
        cache=JudgeCache(cfg.cache),
        concurrency=cfg.concurrency,
        requests_per_second=cfg.requests_per_second,
        timeout_s=cfg.timeout_s,
        max_retries=cfg.max_retries,
        backoff_base_s=cfg.backoff_base_s,
        backoff_max_s=cfg.backoff_max_s,
        malformed_retries=cfg.malformed_retries,
        temperature=cfg.temperature,
        logprobs=cfg.logprobs,
        price_prompt_per_m=cfg.price_prompt_per_m,
        price_completion_per_m=cfg.price_completion_per_m,
        prompts=PromptBuilder(labels=(cfg.answer_labels[0], cfg.answer_labels[1])),
    )


def _local_judge(cfg: LocalJudgeConfig) -> Judge:
    from dmoerm.labelling.cache import JudgeCache
    from dmoerm.labelling.local import LocalJudge
    from dmoerm.labelling.prompts import PromptBuilder

    labels = (cfg.answer_labels[0], cfg.answer_labels[1])
    return LocalJudge(
        cfg.model,
        cache=JudgeCache(cfg.cache),
        device=cfg.device,
        dtype=cfg.dtype,
        batch_size=cfg.batch_size,
        reuse_prefix=cfg.reuse_prefix,
        max_length=cfg.max_length,
        prompts=PromptBuilder(labels=labels, max_chars_response=4000, max_chars_conversation=6000),
    )
