"""The reward server's request models (:mod:`dmoerm.serving.schemas`): the same answers as the hand-written
parser they replace, in process and over real HTTP on 127.0.0.1 (a body sent as ``text/plain`` or ``null``)."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest

from dmoerm.data import Message
from dmoerm.serving import (
    RequestError,
    ServeConfig,
    create_app,
    parse_classify,
    parse_get_reward,
    parse_score,
)
from dmoerm.serving.schemas import GetRewardRequest, RequestLimits, ScoreRequest, request_limits
from test_serving import CONVERSATIONS, RESPONSES, ServerThread, TinyScorer, items_payload

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = SimpleNamespace(max_items_per_request=3)


def _refused(parse, payload, limit=None) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse(payload, CONFIG, limit)
    return info.value


def test_valid_bodies_parse_to_texts_and_messages():
    assert parse_get_reward({"query": "one text", "prompts": ["p"], "labels": [None]}, CONFIG) == ["one text"]
    convs, resps = parse_score(items_payload(CONVERSATIONS[1:3], RESPONSES[1:3]), CONFIG)
    assert convs == [list(c) for c in CONVERSATIONS[1:3]] and resps == RESPONSES[1:3]
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert parse_classify({"model": "m", "messages": chat}, CONFIG, None) == (
        "items",
        ([[Message("user", "hi")]], ["hello"]),
    )
    assert parse_classify({"input": ["a", "b"]}, CONFIG, None) == ("texts", ["a", "b"])


@pytest.mark.parametrize(
    ("parse", "payload", "limit", "status", "code", "message"),
    [
        (parse_get_reward, None, None, 422, "invalid_request", "expected a JSON object with a 'query' list, got NoneType"),
        (parse_get_reward, {"query": ["a"] * 4}, None, 413, "too_many_items", "query: 4 items, the limit is 3"),
        (parse_get_reward, {"query": ["ok", "abcdef"]}, 5, 413, "input_too_long", "query[1]: 6 characters, over"),
        (parse_get_reward, {"query": ["a\ud800"]}, None, 422, "invalid_request", "query[0]: lone surrogate '\\ud800'"),
        (parse_get_reward, {"query": ["a"], "normalize": 1}, None, 422, "invalid_request", "normalize: expected true"),
        (parse_score, {"items": [{"conversation": [{"role": "robot", "content": "x"}], "response": "y"}]}, None,
         422, "invalid_request", "items[0].conversation[0].role: unknown role 'robot'"),
        (parse_score, {"items": [{"conversation": [{"role": "user", "content": "abc"}], "response": "abc"}]}, 5,
         413, "input_too_long", "items[0]: 6 characters in conversation and response"),
        (parse_classify, {"messages": [{"role": "user", "content": "hi"}]}, None, 422, "invalid_request",
         "messages: expected a chat ending with the assistant reply"),
        (parse_classify, {"input": [7]}, None, 422, "invalid_request", "input[0]: token ids are not supported"),
    ],
)  # fmt: skip
def test_refusals_name_the_field(parse, payload, limit, status, code, message):
    error = _refused(parse, payload, limit)
    assert (error.status, error.code) == (status, code)
    assert error.message.startswith(message), error.message


def test_models_are_never_validated_without_the_servers_limits():
    with pytest.raises(RuntimeError, match="request_limits"):
        GetRewardRequest.model_validate({"query": ["x"]})
    with request_limits(RequestLimits(max_items=1, max_text_chars=None)):
        assert GetRewardRequest.model_validate({"query": ["x"]}).query == ["x"]
        assert len(ScoreRequest.model_validate(items_payload(CONVERSATIONS[:1], RESPONSES[:1])).items) == 1


def test_any_content_type_is_read_as_json_and_null_is_refused_by_name(tiny_backbone):
    scorer = TinyScorer(tiny_backbone)
    with ServerThread(create_app(scorer, ServeConfig(max_wait_ms=1))) as srv:
        for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {"content-type": content_type} if content_type else {}
            r = httpx.post(f"{srv.url}/get_reward", content=b'{"query": ["hi"]}', headers=headers, timeout=30)
            assert r.status_code == 200, r.text
            assert r.json()["rewards"] == pytest.approx(scorer.score_texts(["hi"]), abs=1e-5)
        r = httpx.post(f"{srv.url}/score", content=b"null", timeout=30)
        assert r.status_code == 422
        assert r.json() == {
            "error": {
                "code": "invalid_request",
                "message": "expected a JSON object with an 'items' list, got NoneType",
            }
        }
