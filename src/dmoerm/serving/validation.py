"""Reading a request for the reward server: the body under its byte limit, its JSON, and the checks on counts and
texts that the request models (:mod:`dmoerm.serving.schemas`) apply; every failure is a :class:`RequestError`,
answered as a 4xx ``{"error": {"code", "message"}}``, never a trace.

Texts are refused by size (``max_text_chars``) and checked for lone surrogates here, before anything tokenises
them. Messages here name no field: the caller prefixes the field's path (``items[3].conversation[0].content``).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

__all__ = ["RequestError", "check_count", "check_text", "parse_json", "read_body", "request_error"]


class RequestError(Exception):
    """A client error, answered with ``status`` and a JSON body naming ``code``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def request_error(status: int, code: str, message: str) -> RequestError:
    return RequestError(status, code, message)


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused (413) from its Content-Length before reading, or as soon as it passes ``limit``."""
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


def check_count(n: int, max_items: int) -> None:
    """Refuse an empty list (422) or one over ``max_items`` (413, ``max_items_per_request``)."""
    if n == 0:
        raise request_error(422, "empty", "empty list; send at least one item")
    if n > max_items:
        raise request_error(
            413, "too_many_items", f"{n} items, the limit is {max_items} per request; split the request"
        )


def check_text(text: str, limit: int | None) -> None:
    """Refuse a text over ``limit`` characters (413) or with a lone surrogate (422), before any tokeniser."""
    if limit is not None and len(text) > limit:
        raise request_error(
            413,
            "input_too_long",
            f"{len(text)} characters, over the limit of {limit} (max_text_chars: 16 per token of "
            "the model's max_length by default); shorten it",
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON may carry "\ud800": valid JSON, not valid Unicode text
        raise request_error(
            422,
            "invalid_request",
            f"lone surrogate {text[exc.start]!r} at character {exc.start}; send valid Unicode text",
        ) from None
