"""Request validation of the reward server (:mod:`dmoerm.serving`): hand-parsed JSON, so that every failure is
a clear 4xx naming the field (``items[3].conversation[0].content: ...``), never a trace.

Texts are refused by size (``max_text_chars``) and checked for lone surrogates here, before anything tokenises
them. ``config`` is the server's :class:`dmoerm.serving.ServeConfig` (only ``max_items_per_request`` is read).
"""

from __future__ import annotations

import json
from typing import Any

from dmoerm.data import Message

__all__ = [
    "RequestError",
    "parse_classify",
    "parse_get_reward",
    "parse_json",
    "parse_normalize",
    "parse_score",
    "request_error",
]


class RequestError(Exception):
    """A client error, answered with ``status`` and a JSON body naming ``code``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def request_error(status: int, code: str, message: str) -> RequestError:
    return RequestError(status, code, message)


def parse_json(body: bytes) -> Any:
    if not body:
        raise request_error(400, "invalid_json", "empty body; send a JSON object")
    try:
        return json.loads(body)
    except UnicodeDecodeError:
        raise request_error(400, "invalid_json", "body is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise request_error(
            400, "invalid_json", f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise request_error(400, "invalid_json", "JSON nested too deeply") from None


def check_count(n: int, what: str, config: Any) -> None:
    if n == 0:
        raise request_error(422, "empty", f"{what}: empty list; send at least one item")
    if n > config.max_items_per_request:
        raise request_error(
            413,
            "too_many_items",
            f"{what}: {n} items, the limit is {config.max_items_per_request} per request; split the request",
        )


def check_text(text: str, where: str, limit: int | None) -> None:
    """Refuse a text over ``limit`` characters (413) or with a lone surrogate (422), before any tokeniser."""
    if limit is not None and len(text) > limit:
        raise request_error(
            413,
            "input_too_long",
            f"{where}: {len(text)} characters, over the limit of {limit} (max_text_chars: 16 per token of "
            "the model's max_length by default); shorten it",
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON may carry "\ud800": valid JSON, not valid Unicode text
        raise request_error(
            422,
            "invalid_request",
            f"{where}: lone surrogate {text[exc.start]!r} at character {exc.start}; send valid Unicode text",
        ) from None


def parse_normalize(payload: dict) -> bool:
    value = payload.get("normalize", True)
    if not isinstance(value, bool):
        raise request_error(
            422, "invalid_request", f"normalize: expected true or false, got {type(value).__name__}"
        )
    return value


def parse_get_reward(payload: Any, config: Any, limit: int | None = None) -> list[str]:
    if not isinstance(payload, dict):
        raise request_error(
            422,
            "invalid_request",
            f"expected a JSON object with a 'query' list, got {type(payload).__name__}",
        )
    if "query" not in payload:
        raise request_error(
            422, "invalid_request", "missing field 'query' (a list of prompt+response strings)"
        )
    query = payload["query"]
    if isinstance(query, str):
        query = [query]
    if not isinstance(query, list):
        raise request_error(
            422, "invalid_request", f"query: expected a list of strings, got {type(query).__name__}"
        )
    check_count(len(query), "query", config)
    for i, text in enumerate(query):
        if not isinstance(text, str):
            raise request_error(
                422, "invalid_request", f"query[{i}]: expected a string, got {type(text).__name__}"
            )
        if not text.strip():
            raise request_error(422, "invalid_request", f"query[{i}]: empty string")
        check_text(text, f"query[{i}]", limit)
    return query


def parse_score(payload: Any, config: Any, limit: int | None = None) -> tuple[list[list[Message]], list[str]]:
    if not isinstance(payload, dict):
        raise request_error(
            422,
            "invalid_request",
            f"expected a JSON object with an 'items' list, got {type(payload).__name__}",
        )
    if "items" not in payload:
        raise request_error(
            422, "invalid_request", "missing field 'items' (a list of {conversation, response})"
        )
    items = payload["items"]
    if not isinstance(items, list):
        raise request_error(422, "invalid_request", f"items: expected a list, got {type(items).__name__}")
    check_count(len(items), "items", config)
    conversations: list[list[Message]] = []
    responses: list[str] = []
    for i, item in enumerate(items):
        where = f"items[{i}]"
        if not isinstance(item, dict):
            raise request_error(
                422, "invalid_request", f"{where}: expected an object, got {type(item).__name__}"
            )
        conv = item.get("conversation")
        response = item.get("response")
        if not isinstance(conv, list) or not conv:
            raise request_error(
                422,
                "invalid_request",
                f"{where}.conversation: expected a non-empty list of {{role, content}}",
            )
        if not isinstance(response, str):
            raise request_error(
                422, "invalid_request", f"{where}.response: expected a string, got {type(response).__name__}"
            )
        messages: list[Message] = []
        for j, turn in enumerate(conv):
            at = f"{where}.conversation[{j}]"
            if not isinstance(turn, dict):
                raise request_error(422, "invalid_request", f"{at}: expected an object with role and content")
            role, content = turn.get("role"), turn.get("content")
            if not isinstance(role, str) or not isinstance(content, str):
                raise request_error(422, "invalid_request", f"{at}: role and content must both be strings")
            check_text(role, f"{at}.role", None)
            check_text(content, f"{at}.content", None)
            try:
                messages.append(Message(role=role, content=content))
            except ValueError as exc:
                raise request_error(422, "invalid_request", f"{at}.{exc}") from None
        if messages[-1].role != "user":
            raise request_error(
                422,
                "invalid_request",
                f"{where}.conversation: the last turn must be a user turn (the response answers it)",
            )
        check_text(response, f"{where}.response", None)
        total = len(response) + sum(len(m.content) for m in messages)
        if limit is not None and total > limit:
            raise request_error(
                413,
                "input_too_long",
                f"{where}: {total} characters in conversation and response, over the limit of {limit} "
                "(max_text_chars); shorten it",
            )
        conversations.append(messages)
        responses.append(response)
    return conversations, responses


def parse_classify(payload: Any, config: Any, limit: int | None) -> tuple[str, Any]:
    """vLLM's classification/pooling request: ``("texts", [str])`` from ``input``, or ``("items", (convs,
    responses))`` from ``messages`` (a chat whose last turn is the assistant reply to score)."""
    if not isinstance(payload, dict):
        raise request_error(
            422, "invalid_request", f"expected a JSON object with 'input', got {type(payload).__name__}"
        )
    if "messages" in payload and payload.get("input") is None:
        turns = payload["messages"]
        if not isinstance(turns, list) or len(turns) < 2 or not isinstance(turns[-1], dict):
            raise request_error(
                422, "invalid_request", "messages: expected a chat ending with the assistant reply"
            )
        last = turns[-1]
        if last.get("role") != "assistant" or not isinstance(last.get("content"), str):
            raise request_error(422, "invalid_request", "messages[-1]: expected the assistant reply to score")
        convs, responses = parse_score(
            {"items": [{"conversation": turns[:-1], "response": last["content"]}]}, config, limit
        )
        return "items", (convs, responses)
    if "input" not in payload:
        raise request_error(
            422, "invalid_request", "missing field 'input' (a rendered chat string or a list of them)"
        )
    texts = payload["input"]
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list):
        raise request_error(
            422,
            "invalid_request",
            f"input: expected a string or a list of strings, got {type(texts).__name__}",
        )
    check_count(len(texts), "input", config)
    for i, text in enumerate(texts):
        if isinstance(text, (int, list)):
            raise request_error(
                422, "invalid_request", f"input[{i}]: token ids are not supported; send the rendered text"
            )
        if not isinstance(text, str) or not text.strip():
            raise request_error(422, "invalid_request", f"input[{i}]: expected a non-empty string")
        check_text(text, f"input[{i}]", limit)
    return "texts", texts
