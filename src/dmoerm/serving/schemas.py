"""The reward server's request and response bodies as pydantic models; FastAPI validates each request with them.

Every check keeps the answer clients got from the hand-written parser before: a 4xx whose message names the
field (``items[3].conversation[0].content: lone surrogate ...``), with the code ``invalid_request``, ``empty``,
``too_many_items`` or ``input_too_long``. A validator raises a :class:`~pydantic_core.PydanticCustomError`
whose type is that code and whose message names no field; :func:`request_error_of` prefixes the field's path
from the error's ``loc`` and picks the status (:data:`STATUS_OF_CODE`).

The per-server limits (``max_items_per_request``, ``max_text_chars``) are a :class:`RequestLimits` read from the
validation context (``model_validate(..., context={"limits": ...})``) or, since FastAPI passes no context to a
body model, from :func:`request_limits`, which the server's route class sets around each request.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Field,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError

from dmoerm.data import Message
from dmoerm.serving.validation import RequestError, check_count, check_text

__all__ = [
    "STATUS_OF_CODE",
    "ChatTurn",
    "ClassificationData",
    "ClassificationResponse",
    "ClassifyRequest",
    "GetRewardRequest",
    "GetRewardResponse",
    "HealthResponse",
    "PoolingData",
    "PoolingResponse",
    "RequestLimits",
    "ScoreItem",
    "ScoreRequest",
    "ScoreResponse",
    "ScoreResult",
    "Usage",
    "parse_classify",
    "parse_get_reward",
    "parse_score",
    "request_error_of",
    "request_limits",
]

STATUS_OF_CODE = {"invalid_request": 422, "empty": 422, "too_many_items": 413, "input_too_long": 413}
"""The HTTP status of each error code a request model raises."""


@dataclass(frozen=True)
class RequestLimits:
    """The limits of one server that request validation applies."""

    max_items: int
    """Most items (texts or conversation/response pairs) in one request (``max_items_per_request``)."""
    max_text_chars: int | None
    """Longest text in characters (``ServeConfig.text_limit``); None: no limit."""


_LIMITS: contextvars.ContextVar[RequestLimits | None] = contextvars.ContextVar("dmoerm_limits", default=None)


@contextlib.contextmanager
def request_limits(limits: RequestLimits) -> Iterator[None]:
    """Validate the request models under ``limits`` in this context (the FastAPI path)."""
    token = _LIMITS.set(limits)
    try:
        yield
    finally:
        _LIMITS.reset(token)


def _limits(info: ValidationInfo) -> RequestLimits:
    if isinstance(info.context, dict) and "limits" in info.context:
        return info.context["limits"]
    limits = _LIMITS.get()
    if limits is None:  # a server bug, not a client error: never validate without the server's limits
        raise RuntimeError(
            "request models are validated with context={'limits': ...} or under request_limits"
        )
    return limits


# ----------------------------------------------------------------------------------------------------------
# Errors


def _invalid(message: str, code: str = "invalid_request") -> PydanticCustomError:
    return PydanticCustomError(code, message)


def _checked(check: Callable[..., None], *args: Any) -> None:
    """Run a :mod:`dmoerm.serving.validation` check; its :class:`RequestError` becomes a validation error."""
    try:
        check(*args)
    except RequestError as exc:
        raise _invalid(exc.message, exc.code) from None


def _field_path(loc: tuple) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def request_error_of(errors: list[dict[str, Any]], model: type[_Request] | None = None) -> RequestError:
    """The answer to a failed validation: its first error, prefixed with the field's path.

    ``model`` (the request's model) words the one error FastAPI raises before validating: a JSON ``null`` body.
    """
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    loc = loc[1:] if loc[:1] == ("body",) else loc
    code = first.get("type", "")
    if code == "missing" and not loc and model is not None:
        return RequestError(422, "invalid_request", model.not_an_object(None))
    if (
        code not in STATUS_OF_CODE
    ):  # a check of pydantic's own (none is expected): still a 422 naming the field
        code = "invalid_request"
    where = _field_path(loc)
    message = f"{where}: {first['msg']}" if where else str(first["msg"])
    return RequestError(STATUS_OF_CODE[code], code, message)


# ----------------------------------------------------------------------------------------------------------
# Field checks


def _strict_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _invalid(f"expected true or false, got {type(value).__name__}")
    return value


def _string_list(expected: str) -> Callable[[Any, ValidationInfo], list]:
    """A list field that also takes one string; counted against ``max_items``."""

    def check(value: Any, info: ValidationInfo) -> list:
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list):
            raise _invalid(f"expected {expected}, got {type(value).__name__}")
        _checked(check_count, len(value), _limits(info).max_items)
        return value

    return check


def _item_list(value: Any, info: ValidationInfo) -> list:
    if not isinstance(value, list):
        raise _invalid(f"expected a list, got {type(value).__name__}")
    _checked(check_count, len(value), _limits(info).max_items)
    return value


def _query_text(value: Any, info: ValidationInfo) -> str:
    if not isinstance(value, str):
        raise _invalid(f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise _invalid("empty string")
    _checked(check_text, value, _limits(info).max_text_chars)
    return value


def _input_text(value: Any, info: ValidationInfo) -> str:
    if isinstance(value, (int, list)):
        raise _invalid("token ids are not supported; send the rendered text")
    if not isinstance(value, str) or not value.strip():
        raise _invalid("expected a non-empty string")
    _checked(check_text, value, _limits(info).max_text_chars)
    return value


def _unicode_text(value: str) -> str:
    _checked(check_text, value, None)
    return value


def _role(value: str) -> str:
    _unicode_text(value)
    try:
        Message(role=value, content="")
    except ValueError as exc:  # "role: unknown role ..."; the path already ends in .role
        raise _invalid(str(exc).removeprefix("role: ")) from None
    return value


def _conversation_list(value: Any) -> list:
    if not isinstance(value, list) or not value:
        raise _invalid("expected a non-empty list of {role, content}")
    return value


def _ends_with_user(turns: list[ChatTurn]) -> list[ChatTurn]:
    if turns[-1].role != "user":
        raise _invalid("the last turn must be a user turn (the response answers it)")
    return turns


def _response_text(value: Any) -> str:
    if not isinstance(value, str):
        raise _invalid(f"expected a string, got {type(value).__name__}")
    return _unicode_text(value)


# ----------------------------------------------------------------------------------------------------------
# Requests


class _Request(BaseModel):
    """A request body: a JSON object holding the field ``required``."""

    expected: ClassVar[str]
    """What the body must be, in the error for anything else."""
    required: ClassVar[str]
    """The field the body must have."""
    required_hint: ClassVar[str]
    """What that field holds, in the error when it is missing."""

    @classmethod
    def not_an_object(cls, payload: Any) -> str:
        return f"expected a JSON object {cls.expected}, got {type(payload).__name__}"

    @model_validator(mode="before")
    @classmethod
    def _an_object_with_its_field(cls, payload: Any) -> Any:
        if not isinstance(payload, dict):
            raise _invalid(cls.not_an_object(payload))
        if cls.required not in payload:
            raise _invalid(f"missing field '{cls.required}' ({cls.required_hint})")
        return payload


QueryText = Annotated[str, BeforeValidator(_query_text)]
InputText = Annotated[str, BeforeValidator(_input_text)]
Normalize = Annotated[bool, BeforeValidator(_strict_bool)]


class GetRewardRequest(_Request):
    """OpenRLHF's ``POST /get_reward``: ``{"query": [str, ...], "prompts": [...], "labels": [...]}``."""

    expected: ClassVar[str] = "with a 'query' list"
    required: ClassVar[str] = "query"
    required_hint: ClassVar[str] = "a list of prompt+response strings"

    query: Annotated[list[QueryText], BeforeValidator(_string_list("a list of strings"))]
    """Full rendered prompt+response strings (one string is taken as a list of one)."""
    prompts: Any = None
    """Sent by OpenRLHF; ignored."""
    labels: Any = None
    """Sent by OpenRLHF; ignored."""
    normalize: Normalize = True
    """Apply the server's reward normalization."""


class ChatTurn(BaseModel):
    """One turn of a conversation: ``{"role", "content"}``."""

    role: Annotated[str, BeforeValidator(_role)]
    """``system``, ``user`` or ``assistant``."""
    content: Annotated[str, BeforeValidator(_unicode_text)]
    """The turn's text."""

    @model_validator(mode="before")
    @classmethod
    def _two_strings(cls, turn: Any) -> Any:
        if not isinstance(turn, dict):
            raise _invalid("expected an object with role and content")
        if not isinstance(turn.get("role"), str) or not isinstance(turn.get("content"), str):
            raise _invalid("role and content must both be strings")
        return turn


class ScoreItem(BaseModel):
    """A conversation ending with a user turn, and the response to score."""

    conversation: Annotated[
        list[ChatTurn], BeforeValidator(_conversation_list), AfterValidator(_ends_with_user)
    ] = Field(default=None, validate_default=True)
    """The turns before the response; the last one is the user's."""
    response: Annotated[str, BeforeValidator(_response_text)] = Field(default=None, validate_default=True)
    """The assistant reply to score."""

    @model_validator(mode="before")
    @classmethod
    def _an_object(cls, item: Any) -> Any:
        if not isinstance(item, dict):
            raise _invalid(f"expected an object, got {type(item).__name__}")
        return item

    @model_validator(mode="after")
    def _within_text_limit(self, info: ValidationInfo) -> ScoreItem:
        limit = _limits(info).max_text_chars
        total = len(self.response) + sum(len(t.content) for t in self.conversation)
        if limit is not None and total > limit:
            raise _invalid(
                f"{total} characters in conversation and response, over the limit of {limit} "
                "(max_text_chars); shorten it",
                "input_too_long",
            )
        return self

    def messages(self) -> list[Message]:
        return [Message(role=t.role, content=t.content) for t in self.conversation]


class ScoreRequest(_Request):
    """``POST /score``: ``{"items": [{"conversation": [{"role", "content"}], "response": str}]}``."""

    expected: ClassVar[str] = "with an 'items' list"
    required: ClassVar[str] = "items"
    required_hint: ClassVar[str] = "a list of {conversation, response}"

    items: Annotated[list[ScoreItem], BeforeValidator(_item_list)]
    """The conversation/response pairs to score."""
    normalize: Normalize = True
    """Apply the server's reward normalization."""


class ClassifyRequest(_Request):
    """vLLM's ``POST /classify`` and ``/pooling``: ``{"model", "input": str | [str]}`` or ``{"model",
    "messages": [...]}`` (a chat whose last turn is the assistant reply to score)."""

    expected: ClassVar[str] = "with 'input'"
    required: ClassVar[str] = "input"
    required_hint: ClassVar[str] = "a rendered chat string or a list of them"

    model: Any = None
    """The model name, echoed back when it is a string."""
    input: (
        Annotated[list[InputText], BeforeValidator(_string_list("a string or a list of strings"))] | None
    ) = None
    """Rendered chat strings (None when ``messages`` is given)."""
    items: list[ScoreItem] | None = None
    """``messages`` as one conversation/response pair (filled by the validator; errors name it ``items[0]``,
    as the hand-written parser did)."""
    softmax: Any = None
    """vLLM's oldest name of ``use_activation``."""
    activation: Any = None
    """vLLM's deprecated name of ``use_activation``."""
    use_activation: Any = None
    """Apply the model's activation (a sigmoid for one label); unset means true."""

    @model_validator(mode="before")
    @classmethod
    def _an_object_with_its_field(cls, payload: Any) -> Any:
        if not isinstance(payload, dict):
            raise _invalid(cls.not_an_object(payload))
        if "messages" in payload and payload.get("input") is None:
            turns = payload["messages"]
            if not isinstance(turns, list) or len(turns) < 2 or not isinstance(turns[-1], dict):
                raise _invalid("messages: expected a chat ending with the assistant reply")
            last = turns[-1]
            if last.get("role") != "assistant" or not isinstance(last.get("content"), str):
                raise _invalid("messages[-1]: expected the assistant reply to score")
            item = {"conversation": turns[:-1], "response": last["content"]}
            return {**payload, "input": None, "items": [item]}
        if "input" not in payload:
            raise _invalid(f"missing field 'input' ({cls.required_hint})")
        if payload["input"] is None:
            raise _invalid("input: expected a string or a list of strings, got NoneType")
        return {**payload, "items": None}


# ----------------------------------------------------------------------------------------------------------
# Responses


class GetRewardResponse(BaseModel):
    """OpenRLHF's answer (openrlhf/cli/serve_rm.py line 133); ``extra_logs`` holds the DMoERM breakdown."""

    rewards: list[float | None]
    """One reward per query (None where it is not finite)."""
    scores: list[float | None]
    """The same as ``rewards`` (OpenRLHF reads either)."""
    extra_logs: dict[str, list[float]]
    """Key -> one number per query (:func:`dmoerm.serving.formats.extra_logs`)."""


class ScoreResult(BaseModel):
    """One item's score with its breakdown."""

    reward: float | None
    """The reward, normalized when the answer says ``normalized``."""
    raw_reward: float | None
    """The scorer's reward before normalization."""
    category: str | None
    """The category whose inner model scored the item (DMoERM), else None."""
    category_probability: float | None
    """The router's probability of that category."""
    capability_scores: dict[str, float | None]
    """Capability point -> its expert's score."""


class ScoreResponse(BaseModel):
    """The answer of ``POST /score``."""

    results: list[ScoreResult]
    """One result per item, in order."""
    normalized: bool
    """Whether ``reward`` has the server's normalization applied."""


class Usage(BaseModel):
    """vLLM's ``UsageInfo`` (vllm/entrypoints/openai/engine/protocol.py)."""

    prompt_tokens: int
    total_tokens: int
    completion_tokens: int
    prompt_tokens_details: None


class ClassificationData(BaseModel):
    """vLLM's ``ClassificationData`` for a one-label model."""

    index: int
    label: str
    probs: list[float | None]
    num_classes: int


class ClassificationResponse(BaseModel):
    """vLLM's ``ClassificationResponse``."""

    id: str
    object: str
    created: int
    model: str
    data: list[ClassificationData]
    usage: Usage


class PoolingData(BaseModel):
    """vLLM's ``PoolingResponseData``."""

    index: int
    object: str
    data: list[float | None]


class PoolingResponse(BaseModel):
    """vLLM's ``PoolingResponse``."""

    id: str
    object: str
    created: int
    model: str
    data: list[PoolingData]
    usage: Usage


class HealthResponse(BaseModel):
    """``GET /health``."""

    status: str
    """Always ``ok``."""
    max_length: int
    """The scorer's token limit (0 when it has none)."""
    max_text_chars: int | None
    """The character limit on texts; None: none."""
    categories: list[str] | None
    """The index of ``extra_logs``' ``category_index`` (DMoERM), else None."""
    queue_items: int
    """Items waiting for the scorer."""


# ----------------------------------------------------------------------------------------------------------
# The same validation outside FastAPI (the old hand-written parsers' names)


def _validated(model: type[_Request], payload: Any, config: Any, limit: int | None) -> Any:
    limits = RequestLimits(config.max_items_per_request, limit)
    try:
        return model.model_validate(payload, context={"limits": limits})
    except ValidationError as exc:
        raise request_error_of(exc.errors(), model) from None


def parse_get_reward(payload: Any, config: Any, limit: int | None = None) -> list[str]:
    """A ``/get_reward`` body's texts; :class:`RequestError` naming the field otherwise. ``config``: its
    ``max_items_per_request`` is read."""
    return _validated(GetRewardRequest, payload, config, limit).query


def parse_score(payload: Any, config: Any, limit: int | None = None) -> tuple[list[list[Message]], list[str]]:
    """A ``/score`` body's conversations and responses; :class:`RequestError` naming the field otherwise."""
    items = _validated(ScoreRequest, payload, config, limit).items
    return [item.messages() for item in items], [item.response for item in items]


def parse_classify(payload: Any, config: Any, limit: int | None) -> tuple[str, Any]:
    """vLLM's classification/pooling request: ``("texts", [str])`` from ``input``, or ``("items", (convs,
    responses))`` from ``messages``."""
    request = _validated(ClassifyRequest, payload, config, limit)
    if request.items is None:
        return "texts", request.input
    return "items", ([i.messages() for i in request.items], [i.response for i in request.items])
