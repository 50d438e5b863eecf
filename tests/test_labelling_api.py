"""The OpenAI-compatible judge against a real HTTP server on 127.0.0.1 that answers by rule.

The server prefers the longer response, reports ``usage``, and can be told to answer the next requests with
429 (+ Retry-After), 500, a sleep past the client's timeout, or a malformed answer.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from dmoerm.data import Message, PreferenceRecord
from dmoerm.labelling.api import OpenAIJudge
from dmoerm.labelling.cache import JudgeCache
from dmoerm.labelling.judge import JudgeError
from dmoerm.labelling.pairs import LabelPair
from dmoerm.labelling.pipeline import LabelConfig, label_pairs, run_label
from dmoerm.labelling.schema import read_labels
from dmoerm.taxonomy import Capability, Category, Taxonomy
from helpers import http_server

SECRET = "sk-test-DO-NOT-LEAK-8c1f2e9a"
KEY_ENV = "DMOERM_TEST_JUDGE_KEY"

TAX = Taxonomy(
    name="test",
    categories=(
        Category(
            "chat",
            "Open conversation.",
            (
                Capability("helpfulness", "gives the user what they asked for", "给出用户要的东西"),
                Capability("detail", "gives enough detail", "细节充分"),
            ),
        ),
    ),
)

_RESP = re.compile(r"\[Response (\S+)\]\n(.*?)\n\[End of Response \1\]", re.S)
_RESP_ZH = re.compile(r"\[回复 (\S+)\]\n(.*?)\n\[回复 \1 结束\]", re.S)
_JSON_ITEM = re.compile(r'^- "([a-z_0-9]+)"', re.M)


class FakeServer:
    """State of the rule-based chat-completions server."""

    def __init__(self) -> None:
        self.requests = 0
        """Requests that reached the server (any outcome)."""
        self.answers = 0
        """Requests answered with 200."""
        self.script: list[str] = []
        """Behaviours for the next requests: '429', '500', 'sleep', 'malformed', 'prose_json'."""
        self.delay = 0.0
        self.lock = threading.Lock()
        self.auth_seen: set[str] = set()
        self.targeted: tuple[str, tuple[str, ...], int] | None = None
        """(behaviour, substrings of the prompt, how many times): misbehave for one question only."""
        self.inflight = 0
        self.max_inflight = 0
        """Most requests the server was handling at once."""
        self.retry_after = "0.01"
        """The Retry-After header of 429 answers."""

    def next_behaviour(self, prompt: str) -> str:
        with self.lock:
            self.requests += 1
            if (
                self.targeted is not None
                and all(x in prompt for x in self.targeted[1])
                and self.targeted[2] > 0
            ):
                self.targeted = (self.targeted[0], self.targeted[1], self.targeted[2] - 1)
                return self.targeted[0]
            return self.script.pop(0) if self.script else "ok"

    def answer(self, prompt: str, behaviour: str) -> str:
        resp = dict(_RESP.findall(prompt)) or dict(_RESP_ZH.findall(prompt))
        (l1, r1), (l2, r2) = list(resp.items())
        better = l1 if len(r1) >= len(r2) else l2
        if behaviour == "malformed":
            return "Both responses have merits; I cannot decide."
        if "JSON" in prompt:
            obj = {name: better for name in _JSON_ITEM.findall(prompt)}
            if behaviour == "prose_json":
                return "Sure! Here is my verdict:\n" + json.dumps(obj) + "\nHope this helps."
            if behaviour == "partial_json":
                return json.dumps(dict(list(obj.items())[:1]))
            if behaviour == "broken_json":
                return json.dumps(obj)[:-12]
            return "```json\n" + json.dumps(obj, indent=1) + "\n```"
        return better


def _handler(state: FakeServer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def do_POST(self) -> None:  # noqa: N802
            with state.lock:
                state.inflight += 1
                state.max_inflight = max(state.max_inflight, state.inflight)
            try:
                self._post()
            finally:
                with state.lock:
                    state.inflight -= 1

        def _post(self) -> None:
            auth = self.headers.get("Authorization", "")
            state.auth_seen.add(auth)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            behaviour = state.next_behaviour(body["messages"][-1]["content"])
            if auth != f"Bearer {SECRET}":
                return self._send(401, {"error": {"message": "invalid api key"}})
            if behaviour == "429":
                return self._send(
                    429, {"error": {"message": "slow down"}}, {"Retry-After": state.retry_after}
                )
            if behaviour == "500":
                return self._send(500, {"error": {"message": "boom"}})
            if behaviour == "sleep":
                time.sleep(0.6)
            if state.delay:
                time.sleep(state.delay)
            prompt = body["messages"][-1]["content"]
            text = state.answer(prompt, behaviour)
            with state.lock:
                state.answers += 1
            self._send(
                200,
                {
                    "id": "x",
                    "object": "chat.completion",
                    "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": len(prompt) // 4, "completion_tokens": 1, "total_tokens": 0},
                },
            )

        def _send(self, code: int, obj: dict, headers: dict | None = None) -> None:
            data = json.dumps(obj).encode()
            try:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client timed out and went away

    return Handler


@pytest.fixture()
def server(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    state = FakeServer()
    with http_server(_handler(state)) as base:
        state.url = f"{base}/v1"
        yield state


def _pairs(n: int = 6) -> list[LabelPair]:
    out = []
    for i in range(n):
        short, long = f"Answer {i}.", f"Answer {i}, explained in more detail with an example." + " more" * i
        a, b = (short, long) if i % 2 == 0 else (long, short)
        out.append(LabelPair((Message("user", f"Question number {i}?"),), a, b, "chat", "test", str(i)))
    return out


_ONE_QUESTION = ("[Response 1]\nAnswer 0.\n[End of Response 1]", "terms of detail?")
"""Substrings of one prompt: pair 0, response a first, capability point ``detail``."""


def _judge(server: FakeServer, tmp_path: Path, **kw) -> OpenAIJudge:
    kw.setdefault("cache", JudgeCache(tmp_path / "cache.sqlite"))
    return OpenAIJudge(
        "rule-judge",
        server.url,
        api_key_env=KEY_ENV,
        timeout_s=kw.pop("timeout_s", 2.0),
        backoff_base_s=0.001,
        backoff_max_s=0.01,
        **kw,
    )


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _expected_winner(p: LabelPair) -> str:
    return "a" if len(p.response_a) >= len(p.response_b) else "b"


def test_labels_flow_end_to_end_into_schema_file(server, tmp_path):
    pairs = _pairs(6)
    out = tmp_path / "labels.jsonl"
    judge = _judge(server, tmp_path, price_prompt_per_m=1.0, price_completion_per_m=2.0)
    stats = label_pairs(pairs, TAX, judge, out, progress=False)
    labels = read_labels(out)
    assert len(labels) == 12 and stats.kept == 12 and stats.written == 12
    by_pair = {(lab.response_a, lab.capability): lab for lab in labels}
    for p in pairs:
        for cap in ("helpfulness", "detail"):
            lab = by_pair[(p.response_a, cap)]
            assert lab.winner == _expected_winner(p)
            assert lab.confidence == 1.0 and lab.judge == "openai:rule-judge" and lab.category == "chat"
    assert server.answers == 24  # 6 pairs x 2 capabilities x 2 orders
    assert stats.asked == 24 and stats.cached == 0
    assert stats.position_bias["order_disagreement"] == 0.0
    assert stats.prompt_tokens > 0 and stats.completion_tokens == 24
    assert stats.cost == pytest.approx(stats.prompt_tokens / 1e6 + 2 * 24 / 1e6)
    assert stats.pairs_per_s > 0


def test_retries_are_counted_per_kind(server, tmp_path):
    server.script = ["429", "429", "500", "sleep", "malformed", "malformed"]
    judge = _judge(server, tmp_path, concurrency=1, timeout_s=0.3, malformed_retries=2)
    stats = label_pairs(_pairs(2), TAX, judge, tmp_path / "l.jsonl", progress=False)
    assert stats.retries == {"rate_limit": 2, "server_error": 1, "timeout": 1, "malformed": 2}
    assert stats.kept == 4 and stats.malformed == 0 and stats.failed == 0


def test_malformed_after_retries_is_counted_and_skipped(server, tmp_path):
    server.targeted = ("malformed", _ONE_QUESTION, 3)
    judge = _judge(server, tmp_path, concurrency=1, malformed_retries=2)
    stats = label_pairs(_pairs(1), TAX, judge, tmp_path / "l.jsonl", progress=False)
    assert stats.retries == {"malformed": 2}
    assert stats.malformed == 1 and stats.kept == 1  # one capability lost its first order's answer
    assert len(read_labels(tmp_path / "l.jsonl")) == 1


def test_exhausted_retries_fail_the_question_not_the_run(server, tmp_path):
    server.targeted = ("500", _ONE_QUESTION, 3)
    judge = _judge(server, tmp_path, concurrency=1, max_retries=2)
    stats = label_pairs(_pairs(1), TAX, judge, tmp_path / "l.jsonl", progress=False)
    assert stats.failed == 1 and stats.kept == 1 and stats.retries == {"server_error": 2}
    # the failure was not cached: a rerun asks it again and completes the pair
    again = label_pairs(_pairs(1), TAX, _judge(server, tmp_path), tmp_path / "l.jsonl", progress=False)
    assert again.asked == 1 and again.written == 1
    assert len(read_labels(tmp_path / "l.jsonl")) == 2


def test_rerun_is_served_from_cache(server, tmp_path):
    pairs = _pairs(5)
    label_pairs(pairs, TAX, _judge(server, tmp_path), tmp_path / "a.jsonl", progress=False)
    n = server.requests
    # a fresh output file: every question is asked again, all from the cache
    stats = label_pairs(pairs, TAX, _judge(server, tmp_path), tmp_path / "b.jsonl", progress=False)
    assert server.requests == n
    assert stats.asked == 0 and stats.cached == 20 and stats.kept == 10
    assert sorted(_lines(tmp_path / "a.jsonl")) == sorted(_lines(tmp_path / "b.jsonl"))
    # the same output file: nothing is asked, nothing appended
    stats = label_pairs(pairs, TAX, _judge(server, tmp_path), tmp_path / "b.jsonl", progress=False)
    assert server.requests == n and stats.pairs_done_before == 5 and stats.written == 0
    assert len(_lines(tmp_path / "b.jsonl")) == 10


def test_json_mode_one_call_per_order_and_parses_fenced_and_prose(server, tmp_path):
    server.script = ["ok", "prose_json"]
    judge = _judge(server, tmp_path, mode="json")
    stats = label_pairs(_pairs(4), TAX, judge, tmp_path / "l.jsonl", progress=False)
    assert server.answers == 8  # 4 pairs x 2 orders, both capabilities per call
    assert stats.kept == 8 and stats.malformed == 0
    for lab in read_labels(tmp_path / "l.jsonl"):
        p = next(p for p in _pairs(4) if p.response_a == lab.response_a)
        assert lab.winner == _expected_winner(p)


def test_chinese_prompts_for_chinese_conversations(server, tmp_path):
    pair = LabelPair(
        (Message("user", "请介绍一下北京。"),), "北京是中国的首都，有很多名胜古迹。", "北京。", "chat"
    )
    judge = _judge(server, tmp_path)
    stats = label_pairs([pair], TAX, judge, tmp_path / "l.jsonl", progress=False)
    assert stats.kept == 2
    assert {lab.winner for lab in read_labels(tmp_path / "l.jsonl")} == {"a"}


def test_api_key_never_written(server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    server.script = ["429", "500", "malformed"]
    cfg = LabelConfig(
        data=["unused"],
        out=str(tmp_path / "labels.jsonl"),
        backend="openai",
        model="rule-judge",
        base_url=server.url,
        api_key_env=KEY_ENV,
        backoff_base_s=0.001,
        progress=False,
    )
    from dmoerm.labelling.config import make_judge

    judge = make_judge(cfg)
    assert SECRET not in repr(judge) and SECRET not in judge.identity
    label_pairs(_pairs(3), TAX, judge, cfg.out, progress=False)
    assert server.auth_seen == {f"Bearer {SECRET}"}  # the key was sent...
    blobs = [p.read_bytes() for p in tmp_path.iterdir() if p.is_file()]
    assert any(b"helpfulness" in b for b in blobs)
    for blob in blobs:  # ...and is nowhere on disk: cache DB (+ WAL), labels
        assert SECRET.encode() not in blob
    assert SECRET not in caplog.text and SECRET not in json.dumps(cfg.__dict__)


def test_bad_key_is_a_clear_error(server, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    with pytest.raises(JudgeError, match="HTTP 401"):
        label_pairs(_pairs(1), TAX, _judge(server, tmp_path), tmp_path / "l.jsonl", progress=False)


def test_rate_limit_spaces_requests(server, tmp_path):
    judge = _judge(server, tmp_path, requests_per_second=100.0, concurrency=4)
    t = time.perf_counter()
    label_pairs(_pairs(3), TAX, judge, tmp_path / "l.jsonl", progress=False)  # 12 requests
    assert time.perf_counter() - t >= 0.1


_CHILD = textwrap.dedent(
    """
    import sys
    from dmoerm.data import Message
    from dmoerm.labelling.api import OpenAIJudge
    from dmoerm.labelling.cache import JudgeCache
    from dmoerm.labelling.pipeline import label_pairs
    sys.path.insert(0, {tests!r})
    from test_labelling_api import TAX, _pairs, KEY_ENV
    judge = OpenAIJudge("rule-judge", {url!r}, api_key_env=KEY_ENV, cache=JudgeCache({cache!r}), concurrency=2)
    label_pairs(_pairs(16), TAX, judge, {out!r}, progress=False)
    """
)


def test_killed_run_resumes_to_same_labels(server, tmp_path):
    ref = tmp_path / "ref.jsonl"
    label_pairs(_pairs(16), TAX, _judge(server, tmp_path / "ref"), ref, progress=False)
    out, cache = tmp_path / "run.jsonl", tmp_path / "run.sqlite"
    server.answers = 0
    server.delay = 0.01
    code = _CHILD.format(tests=str(Path(__file__).parent), url=server.url, cache=str(cache), out=str(out))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.monotonic() + 30
    while server.answers < 30 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the child finished before it was killed"
    partial = _lines(out) if out.exists() else []
    assert len(partial) < 32
    with out.open("ab") as f:  # as if the kill had cut a line in half
        f.write(b'{"conversation": [{"role": "us')
    answered_before = server.answers
    server.delay = 0.0
    stats = label_pairs(
        _pairs(16), TAX, _judge(server, tmp_path, cache=JudgeCache(cache)), out, progress=False
    )
    final = _lines(out)
    assert len(final) == len(set(final)) == 32
    assert sorted(final) == sorted(_lines(ref))
    # pairs in the file were skipped; of the other answers, at most the 2 requests in flight were lost
    assert stats.pairs_done_before == len(partial) // 2
    assert stats.cached >= answered_before - 4 * stats.pairs_done_before - 2
    assert stats.asked + stats.cached == 64 - 2 * len(partial)
    # over both runs the server answered each of the 64 questions once, plus at most the 2 lost in flight
    assert 64 <= server.answers <= 64 + 2


def test_records_with_unmapped_category_are_skipped_or_defaulted(server, tmp_path):
    rec = PreferenceRecord.from_pair(
        [Message("user", "Hi?")], "Hello there, friend!", "Hi.", category="unknown"
    )
    judge = _judge(server, tmp_path)
    stats = label_pairs([rec], TAX, judge, tmp_path / "l.jsonl", progress=False)
    assert stats.pairs_no_category == 1 and stats.kept == 0
    stats = label_pairs([rec], TAX, judge, tmp_path / "l.jsonl", default_category="chat", progress=False)
    assert stats.kept == 2


def test_run_label_with_config(server, tmp_path, monkeypatch):
    import dmoerm.labelling.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_records", lambda names, limit=None: _pairs(3))
    monkeypatch.setattr("dmoerm.taxonomy.load_taxonomy", lambda name: TAX)
    cfg = LabelConfig(
        data=["x"], out=str(tmp_path / "l.jsonl"), backend="openai", model="rule-judge", base_url=server.url,
        api_key_env=KEY_ENV, progress=False,
    )  # fmt: skip
    stats = run_label(cfg)
    assert stats.kept == 6
    saved = json.loads((tmp_path / "l.jsonl.stats.json").read_text())
    assert saved["stats"]["kept"] == 6 and saved["config"]["api_key_env"] == KEY_ENV


# ------------------------------------------------------------------------- JSON mode, backoff, concurrency

_JSON_PAIR0_A_FIRST = ("[Response 1]\nAnswer 0.\n[End of Response 1]", "JSON")


def test_json_mode_malformed_json_is_retried_then_counted_and_skipped(server, tmp_path):
    # pair 0 with a first: truncated JSON three times (1 ask + 2 re-asks) -> both points malformed
    server.targeted = ("broken_json", _JSON_PAIR0_A_FIRST, 3)
    judge = _judge(server, tmp_path, mode="json", concurrency=1, malformed_retries=2)
    stats = label_pairs(_pairs(2), TAX, judge, tmp_path / "l.jsonl", progress=False)
    assert stats.retries == {"malformed": 2}
    assert stats.malformed == 2 and stats.kept == 2  # pair 0's two points skipped, pair 1 kept
    assert stats.asked == 4 and server.answers == 6  # 2 pairs x 2 orders, + 2 re-asks
    assert {lab.response_a for lab in read_labels(tmp_path / "l.jsonl")} == {_pairs(2)[1].response_a}
    # the malformed answer was cached: a rerun asks nothing and skips the same points
    again = label_pairs(_pairs(2), TAX, _judge(server, tmp_path, mode="json"), tmp_path / "l.jsonl",
                        progress=False)  # fmt: skip
    assert server.answers == 6 and again.malformed == 2 and again.written == 0


def test_json_mode_partial_answer_is_reasked_and_the_missing_point_skipped(server, tmp_path):
    server.targeted = ("partial_json", _JSON_PAIR0_A_FIRST, 2)  # then a complete answer
    judge = _judge(server, tmp_path, mode="json", concurrency=1, malformed_retries=2)
    stats = label_pairs(_pairs(1), TAX, judge, tmp_path / "l.jsonl", progress=False)
    assert stats.retries == {"malformed": 2} and stats.malformed == 0 and stats.kept == 2
    server.targeted = ("partial_json", _JSON_PAIR0_A_FIRST, 9)  # never complete
    judge = _judge(server, tmp_path / "x", mode="json", concurrency=1, malformed_retries=1)
    stats = label_pairs(_pairs(1), TAX, judge, tmp_path / "m.jsonl", progress=False)
    assert stats.retries == {"malformed": 1} and stats.malformed == 1 and stats.kept == 1
    assert [lab.capability for lab in read_labels(tmp_path / "m.jsonl")] == ["helpfulness"]


def test_backoff_is_exponential_capped_and_honours_retry_after():
    judge = OpenAIJudge("m", "http://127.0.0.1:9/v1", api_key_env=None, backoff_base_s=1.0, backoff_max_s=8.0)
    for attempt, full in enumerate([1.0, 2.0, 4.0, 8.0, 8.0, 8.0]):
        d = [judge._backoff(attempt, None) for _ in range(50)]
        assert all(full / 2 <= x <= full for x in d)  # half fixed, half jitter
        assert max(d) > min(d)
    assert judge._backoff(0, 3.5) == 3.5  # Retry-After wins...
    assert judge._backoff(0, 1e6) == judge.retry_after_max_s  # ...up to a cap


def test_retry_after_header_is_waited_for(server, tmp_path):
    server.retry_after = "0.4"
    server.script = ["429"]
    judge = _judge(server, tmp_path, concurrency=1)
    t = time.perf_counter()
    stats = label_pairs(_pairs(1), TAX, judge, tmp_path / "l.jsonl", progress=False)
    assert time.perf_counter() - t >= 0.4 and stats.retries == {"rate_limit": 1} and stats.kept == 2


def test_connection_errors_are_retried_then_fail_the_question(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = OpenAIJudge(
        "m", f"http://127.0.0.1:{port}/v1", api_key_env=None, max_retries=2, backoff_base_s=0.001,
        backoff_max_s=0.01, cache=JudgeCache(tmp_path / "c.sqlite"),
    )  # fmt: skip
    stats = label_pairs(_pairs(1), TAX, judge, tmp_path / "l.jsonl", progress=False)
    assert stats.retries == {"connection": 8} and stats.failed == 2 and stats.kept == 0
    assert len(JudgeCache(tmp_path / "c.sqlite")) == 0  # failures are not cached: a rerun asks again


def test_concurrency_limit_is_respected_and_used(server, tmp_path):
    server.delay = 0.05
    judge = _judge(server, tmp_path, concurrency=3)
    stats = label_pairs(_pairs(6), TAX, judge, tmp_path / "l.jsonl", progress=False)  # 24 requests
    assert stats.kept == 12
    assert 2 <= server.max_inflight <= 3


def test_usage_fields_give_tokens_and_cost_and_cached_answers_cost_nothing(server, tmp_path):
    judge = _judge(server, tmp_path, price_prompt_per_m=0.15, price_completion_per_m=0.6)
    stats = label_pairs(_pairs(2), TAX, judge, tmp_path / "a.jsonl", progress=False)
    assert stats.completion_tokens == 8 and stats.prompt_tokens > 100
    assert stats.cost == pytest.approx((stats.prompt_tokens * 0.15 + 8 * 0.6) / 1e6)
    again = label_pairs(_pairs(2), TAX, _judge(server, tmp_path, price_prompt_per_m=0.15),
                        tmp_path / "b.jsonl", progress=False)  # fmt: skip
    assert again.cached == 8 and again.prompt_tokens == 0 and again.cost == 0.0
