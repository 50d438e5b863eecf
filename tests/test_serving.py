"""The reward server over real HTTP (uvicorn on 127.0.0.1, a free port, a background thread) and its client.

The scorer is a small real one: the tiny random Llama backbone plus a linear value head read at the last
non-pad token, implementing the :class:`dmoerm.outputs.Scorer` protocol.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections import Counter

import httpx
import pytest
import torch
from torch import nn

from dmoerm.client import AsyncRewardClient, RewardClient, RewardServerError
from dmoerm.data import Message
from dmoerm.outputs import RewardOutput, Scorer
from dmoerm.serving import InputTooLongError, ServeConfig, create_app

pytestmark = pytest.mark.usefixtures("one_torch_thread")


logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------
# Helpers (test_rl.py imports them too)


class TinyScorer:
    """Backbone + linear head (reward, two capability scores) at the last real token; a real Scorer."""

    CAPABILITIES = ("helpfulness", "safety")

    def __init__(self, backbone_dir: str, max_length: int = 256, seed: int = 0) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(backbone_dir)
        self.model = AutoModel.from_pretrained(backbone_dir, dtype=torch.float32).eval()
        torch.manual_seed(seed)
        self.head = nn.Linear(self.model.config.hidden_size, 1 + len(self.CAPABILITIES))
        self.max_length = max_length
        self.delay_s = 0.0
        """Extra seconds per call (to make a request slow on purpose)."""
        self.fail_next = 0
        """How many next calls raise RuntimeError (to test the generic 500)."""
        self.calls: list[int] = []
        """Number of texts of each call."""
        self._lock = threading.Lock()

    def render(self, conversation: list[Message], response: str) -> str:
        messages = [{"role": m.role, "content": m.content} for m in conversation]
        messages.append({"role": "assistant", "content": response})
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    def _forward(self, texts: list[str], batch_size: int) -> torch.Tensor:
        with self._lock:
            self.calls.append(len(texts))
            if self.delay_s:
                time.sleep(self.delay_s)
            if self.fail_next:
                self.fail_next -= 1
                raise RuntimeError("simulated scorer crash /secret/path/model.bin")
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        for i, x in enumerate(ids):
            if len(x) > self.max_length:
                raise InputTooLongError(f"text {i}: {len(x)} tokens, over the limit of {self.max_length}")
            if not x:
                raise ValueError(f"text {i}: no tokens")
        out = torch.empty(len(texts), self.head.out_features)
        pad = self.tokenizer.pad_token_id
        with torch.no_grad():
            for start in range(0, len(ids), batch_size):
                chunk = ids[start : start + batch_size]
                width = max(len(x) for x in chunk)
                input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for i, x in enumerate(chunk):
                    input_ids[i, : len(x)] = torch.tensor(x)
                    mask[i, : len(x)] = 1
                hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
                last = hidden[torch.arange(len(chunk)), mask.sum(1) - 1]
                out[start : start + len(chunk)] = self.head(last)
        return out

    def score_texts(self, texts: list[str], batch_size: int = 16) -> list[float]:
        return self._forward(list(texts), batch_size)[:, 0].tolist()

    def score(
        self, conversations: list[list[Message]], responses: list[str], batch_size: int = 16
    ) -> list[RewardOutput]:
        texts = [self.render(c, r) for c, r in zip(conversations, responses, strict=True)]
        out = self._forward(texts, batch_size)
        return [
            RewardOutput(
                reward=float(row[0]),
                category="chat",
                category_probability=0.75,
                capability_scores={name: float(row[1 + k]) for k, name in enumerate(self.CAPABILITIES)},
            )
            for row in out
        ]


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 on a free port, in a daemon thread."""

    def __init__(self, app) -> None:
        import uvicorn

        from dmoerm.serving.http import uvicorn_config

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # The server's own uvicorn settings (request deadline protocol, keep-alive), as dmoerm serve runs.
        config = getattr(app.state, "config", None) or ServeConfig()
        self.server = uvicorn.Server(
            uvicorn_config(app, "127.0.0.1", self.port, config, log_level="warning", access_log=False)
        )
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


CONVERSATIONS = [
    [Message("user", "What is the capital of France?")],
    [Message("system", "Be brief."), Message("user", "Write a poem about spring.")],
    [
        Message("user", "def add(a, b):"),
        Message("assistant", "return a + b"),
        Message("user", "Is that right?"),
    ],
    [Message("user", "你好，今天天气很好。")],
]
RESPONSES = [
    "Paris is the capital of France.",
    "Spring rain, green leaves.",
    "Yes, the function returns the sum.",
    "是的，天气很好。",
]


def items_payload(conversations, responses) -> dict:
    return {
        "items": [
            {"conversation": [{"role": m.role, "content": m.content} for m in c], "response": r}
            for c, r in zip(conversations, responses, strict=True)
        ]
    }


# ----------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def scorer(tiny_backbone) -> TinyScorer:
    return TinyScorer(tiny_backbone)


@pytest.fixture(scope="module")
def server(scorer):
    config = ServeConfig(
        max_batch_size=32, max_wait_ms=30, max_items_per_request=16, max_body_bytes=64 * 1024
    )
    with ServerThread(create_app(scorer, config)) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def assert_alive(http: httpx.Client, scorer: TinyScorer) -> None:
    r = http.post("/get_reward", json={"query": ["hello there"]})
    assert r.status_code == 200, r.text
    assert r.json()["rewards"][0] == pytest.approx(scorer.score_texts(["hello there"])[0], abs=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Agreement with in-process scoring


def test_tiny_scorer_implements_protocol(scorer):
    assert isinstance(scorer, Scorer)


def test_get_reward_matches_in_process(http, scorer):
    texts = [scorer.render(c, r) for c, r in zip(CONVERSATIONS, RESPONSES, strict=True)]
    # OpenRLHF posts prompts and labels too; they are accepted and ignored.
    r = http.post("/get_reward", json={"query": texts, "prompts": ["p"] * 4, "labels": [None] * 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"rewards", "scores", "extra_logs"}  # openrlhf/cli/serve_rm.py line 133
    expected = scorer.score_texts(texts)
    assert body["rewards"] == pytest.approx(expected, abs=1e-5)
    assert body["scores"] == body["rewards"]
    assert body["extra_logs"] == {}  # TinyScorer.score_texts gives no breakdown


def test_score_matches_in_process(http, scorer):
    r = http.post("/score", json=items_payload(CONVERSATIONS, RESPONSES))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["normalized"] is False
    expected = scorer.score(CONVERSATIONS, RESPONSES)
    assert len(body["results"]) == len(expected)
    for got, want in zip(body["results"], expected, strict=True):
        assert got["reward"] == pytest.approx(want.reward, abs=1e-5)
        assert got["raw_reward"] == pytest.approx(want.reward, abs=1e-5)
        assert got["category"] == "chat"
        assert got["category_probability"] == pytest.approx(0.75)
        assert got["capability_scores"].keys() == want.capability_scores.keys()
        for k, v in want.capability_scores.items():
            assert got["capability_scores"][k] == pytest.approx(v, abs=1e-5)


def test_both_endpoints_agree(http, scorer):
    texts = [scorer.render(c, r) for c, r in zip(CONVERSATIONS, RESPONSES, strict=True)]
    a = http.post("/get_reward", json={"query": texts}).json()["rewards"]
    b = [
        x["reward"]
        for x in http.post("/score", json=items_payload(CONVERSATIONS, RESPONSES)).json()["results"]
    ]
    assert a == pytest.approx(b, abs=1e-5)


def test_health_and_stats(http, scorer):
    h = http.get("/health").json()
    assert h["status"] == "ok" and h["max_length"] == scorer.max_length
    s = http.get("/stats").json()
    for key in (
        "requests",
        "batches",
        "batch_items_histogram",
        "batch_requests_histogram",
        "max_batch_requests",
    ):
        assert key in s


# ----------------------------------------------------------------------------------------------------------
# Dynamic batching


def _hist(http) -> Counter:
    return Counter({int(k): v for k, v in http.get("/stats").json()["batch_requests_histogram"].items()})


def test_concurrent_requests_are_merged(server, http, scorer):
    before = _hist(http)
    texts = [f"{scorer.render(CONVERSATIONS[0], 'answer number ' + str(i))}" for i in range(8)]
    expected = scorer.score_texts(texts)

    async def main() -> list[float]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            rs = await asyncio.gather(*(client.post("/get_reward", json={"query": [t]}) for t in texts))
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
        return [r.json()["rewards"][0] for r in rs]

    got = asyncio.run(main())
    assert got == pytest.approx(expected, abs=1e-5)  # each request got its own result back
    merged = _hist(http) - before
    assert sum(merged.values()) >= 1
    assert max(merged) > 1, f"no batch merged several requests: {dict(merged)}"
    assert sum(k * v for k, v in merged.items()) == 8


def test_mixed_kinds_in_one_batch(server, scorer):
    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            return await asyncio.gather(
                client.post("/get_reward", json={"query": ["plain text one"]}),
                client.post("/score", json=items_payload(CONVERSATIONS[:2], RESPONSES[:2])),
                client.post("/get_reward", json={"query": ["plain text two"]}),
            )

    a, b, c = asyncio.run(main())
    assert a.json()["rewards"][0] == pytest.approx(scorer.score_texts(["plain text one"])[0], abs=1e-5)
    assert c.json()["rewards"][0] == pytest.approx(scorer.score_texts(["plain text two"])[0], abs=1e-5)
    want = [o.reward for o in scorer.score(CONVERSATIONS[:2], RESPONSES[:2])]
    assert [x["reward"] for x in b.json()["results"]] == pytest.approx(want, abs=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Bad input: 4xx, clear JSON error, server keeps serving

GOOD_ITEM = {"conversation": [{"role": "user", "content": "hi"}], "response": "hello"}

BAD_REQUESTS = [
    ("/get_reward", b"{not json", 400, "invalid_json"),
    ("/get_reward", b"", 400, "invalid_json"),
    ("/get_reward", b"\xff\xfe\x00", 400, "invalid_json"),
    ("/get_reward", b"[1, 2]", 422, "invalid_request"),
    ("/get_reward", b'{"prompts": ["x"]}', 422, "invalid_request"),
    ("/get_reward", b'{"query": 5}', 422, "invalid_request"),
    ("/get_reward", b'{"query": ["ok", 3]}', 422, "invalid_request"),
    ("/get_reward", b'{"query": [null]}', 422, "invalid_request"),
    ("/get_reward", b'{"query": []}', 422, "empty"),
    ("/get_reward", b'{"query": ["  "]}', 422, "invalid_request"),
    ("/get_reward", json.dumps({"query": ["x"] * 17}).encode(), 413, "too_many_items"),
    ("/get_reward", json.dumps({"query": ["word " * 500]}).encode(), 413, "input_too_long"),
    ("/get_reward", json.dumps({"query": ["x" * 70_000]}).encode(), 413, "body_too_large"),
    ("/get_reward", b'{"query": ["x"], "normalize": "yes"}', 422, "invalid_request"),
    ("/score", b'{"items": []}', 422, "empty"),
    ("/score", b'{"items": {"a": 1}}', 422, "invalid_request"),
    ("/score", b'{"items": [5]}', 422, "invalid_request"),
    ("/score", json.dumps({"items": [GOOD_ITEM] * 17}).encode(), 413, "too_many_items"),
    (
        "/score",
        json.dumps({"items": [{"conversation": [], "response": "x"}]}).encode(),
        422,
        "invalid_request",
    ),
    ("/score", json.dumps({"items": [{**GOOD_ITEM, "response": 1}]}).encode(), 422, "invalid_request"),
    ("/score", json.dumps({"items": [{"response": "x"}]}).encode(), 422, "invalid_request"),
    (
        "/score",
        json.dumps(
            {"items": [{"conversation": [{"role": "robot", "content": "x"}], "response": "x"}]}
        ).encode(),
        422,
        "invalid_request",
    ),
    (
        "/score",
        json.dumps(
            {"items": [{"conversation": [{"role": "user", "content": ["x"]}], "response": "x"}]}
        ).encode(),
        422,
        "invalid_request",
    ),
    (
        "/score",
        json.dumps(
            {"items": [{"conversation": [{"role": "assistant", "content": "x"}], "response": "x"}]}
        ).encode(),
        422,
        "invalid_request",
    ),
    (
        "/score",
        json.dumps({"items": [{**GOOD_ITEM, "response": "word " * 500}]}).encode(),
        413,
        "input_too_long",
    ),
]


@pytest.mark.parametrize(("path", "body", "status", "code"), BAD_REQUESTS)
def test_bad_input_gets_clear_4xx(http, scorer, path, body, status, code):
    r = http.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in r.text
    assert_alive(http, scorer)


def test_unknown_route_and_method_are_json(http):
    r = http.get("/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = http.get("/get_reward")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_too_long_item_does_not_fail_requests_batched_with_it(server, http, scorer):
    long_text = "word " * 500

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            return await asyncio.gather(
                client.post("/get_reward", json={"query": ["short one"]}),
                client.post("/get_reward", json={"query": [long_text]}),
                client.post("/get_reward", json={"query": ["short two"]}),
            )

    a, bad, c = asyncio.run(main())
    assert bad.status_code == 413
    assert a.status_code == 200 and c.status_code == 200
    assert a.json()["rewards"][0] == pytest.approx(scorer.score_texts(["short one"])[0], abs=1e-5)
    assert c.json()["rewards"][0] == pytest.approx(scorer.score_texts(["short two"])[0], abs=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Auth


def test_bearer_token(scorer):
    token = "s3cret-Token_42"
    with (
        ServerThread(create_app(scorer, ServeConfig(token=token))) as srv,
        httpx.Client(base_url=srv.url) as c,
    ):
        body = {"query": ["hi"]}
        r = c.post("/get_reward", json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
        assert token not in r.text
        assert c.post("/get_reward", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.post("/get_reward", json=body, headers={"Authorization": token}).status_code == 401
        assert c.post("/score", json=items_payload(CONVERSATIONS[:1], RESPONSES[:1])).status_code == 401
        assert c.get("/stats").status_code == 401
        assert c.get("/health").status_code == 200
        ok = c.post("/get_reward", json=body, headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200
        with RewardClient(srv.url, token=token) as client:
            assert client.get_reward(["hi"]) == pytest.approx(ok.json()["rewards"], abs=1e-6)
        with RewardClient(srv.url, retries=0) as client, pytest.raises(RewardServerError) as info:
            client.get_reward(["hi"])
        assert info.value.status_code == 401


def test_token_is_not_in_config_repr():
    assert "abc123" not in repr(ServeConfig(token="abc123"))


# ----------------------------------------------------------------------------------------------------------
# Disconnects, internal errors


@pytest.fixture
def slow_server(tiny_backbone):
    scorer = TinyScorer(tiny_backbone)
    with ServerThread(create_app(scorer, ServeConfig(max_wait_ms=0))) as srv:
        yield srv, scorer


def test_client_disconnect_costs_nothing_else(slow_server):
    srv, scorer = slow_server
    scorer.delay_s = 0.6
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        # A occupies the worker; B queues behind it and its client gives up (closes the connection).
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(a=c.post("/get_reward", json={"query": ["first"]})))
        t.start()
        time.sleep(0.15)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{srv.url}/get_reward", json={"query": ["abandoned"]}, timeout=0.2)
        t.join(timeout=30)
        assert result["a"].status_code == 200
        scorer.delay_s = 0.0
        deadline = time.monotonic() + 10
        while True:
            stats = c.get("/stats").json()
            if stats["dropped_requests"] + stats["discarded_results"] >= 1 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert stats["dropped_requests"] == 1, stats  # dropped from the queue, never scored
        assert [n for n in scorer.calls if n] == [1]  # only "first" reached the scorer
        r = c.post("/get_reward", json={"query": ["later"]})
        assert r.status_code == 200
        assert r.json()["rewards"][0] == pytest.approx(scorer.score_texts(["later"])[0], abs=1e-5)


def test_scorer_crash_is_a_generic_500_and_server_survives(slow_server, caplog):
    srv, scorer = slow_server
    scorer.fail_next = 1
    with (
        httpx.Client(base_url=srv.url, timeout=30) as c,
        caplog.at_level(logging.ERROR, logger="dmoerm.serving"),
    ):
        r = c.post("/get_reward", json={"query": ["boom"]})
        assert r.status_code == 500
        assert r.json() == {"error": {"code": "internal_error", "message": "internal server error"}}
        assert "secret" not in r.text and "Traceback" not in r.text
        assert any("simulated scorer crash" in (rec.exc_text or "") or rec.exc_info for rec in caplog.records)
        assert c.post("/get_reward", json={"query": ["fine"]}).status_code == 200


def test_client_retries_5xx_then_succeeds(slow_server):
    srv, scorer = slow_server
    scorer.fail_next = 2
    with RewardClient(srv.url, retries=3, backoff_s=0.01) as client:
        assert client.get_reward(["retry me"]) == pytest.approx(scorer.score_texts(["retry me"]), abs=1e-5)
    scorer.fail_next = 5
    with RewardClient(srv.url, retries=1, backoff_s=0.01) as client, pytest.raises(RewardServerError) as info:
        client.get_reward(["give up"])
    assert info.value.status_code == 500
    scorer.fail_next = 0


def test_client_connection_error_is_retried_then_raised():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens here once closed
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        raise httpx.ConnectError("refused", request=request)

    with RewardClient(
        f"http://127.0.0.1:{port}", retries=2, backoff_s=0.0, transport=httpx.MockTransport(handler)
    ) as c:
        with pytest.raises(RewardServerError, match="cannot reach"):
            c.get_reward(["x"])
    assert len(calls) == 3


def test_client_4xx_is_not_retried(server):
    with RewardClient(server.url, retries=3, backoff_s=0.01) as client:
        with pytest.raises(RewardServerError) as info:
            client.score([[Message("user", "hi")]], ["word " * 500])
        assert info.value.status_code == 413 and info.value.code == "input_too_long"


def test_client_splits_large_calls(server, scorer):
    texts = [f"text number {i}" for i in range(40)]  # the server takes 16 per request
    with RewardClient(server.url, max_items_per_request=16) as client:
        assert client.get_reward(texts) == pytest.approx(scorer.score_texts(texts), abs=1e-5)
        outs = client.score(CONVERSATIONS * 5, RESPONSES * 5)
    want = scorer.score(CONVERSATIONS * 5, RESPONSES * 5)
    assert [o.reward for o in outs] == pytest.approx([o.reward for o in want], abs=1e-5)
    assert outs[0].category == "chat" and set(outs[0].capability_scores) == set(TinyScorer.CAPABILITIES)


def test_async_client(server, scorer):
    async def main():
        async with AsyncRewardClient(server.url, max_items_per_request=16) as client:
            rewards = await client.get_reward([f"t{i}" for i in range(20)])
            outs = await client.score(CONVERSATIONS, RESPONSES)
            health = await client.health()
        return rewards, outs, health

    rewards, outs, health = asyncio.run(main())
    assert rewards == pytest.approx(scorer.score_texts([f"t{i}" for i in range(20)]), abs=1e-5)
    assert [o.reward for o in outs] == pytest.approx(
        [o.reward for o in scorer.score(CONVERSATIONS, RESPONSES)], abs=1e-5
    )
    assert health["status"] == "ok"


# ----------------------------------------------------------------------------------------------------------
# Load


def test_bounded_load_has_no_errors(server, http, scorer):
    clients, duration_s, cap = 32, 3.0, 3000
    texts = [scorer.render(CONVERSATIONS[i % 4], RESPONSES[i % 4] + f" #{i}") for i in range(64)]
    expected = dict(zip(texts, scorer.score_texts(texts), strict=True))
    before = http.get("/stats").json()

    async def main() -> tuple[int, list[str], float]:
        sent = 0
        errors: list[str] = []
        stop = time.monotonic() + duration_s
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as client:

            async def worker(k: int) -> None:
                nonlocal sent
                i = k
                while time.monotonic() < stop and sent < cap:
                    sent += 1
                    text = texts[i % len(texts)]
                    i += clients
                    try:
                        r = await client.post("/get_reward", json={"query": [text]})
                        if r.status_code != 200:
                            errors.append(f"{r.status_code} {r.text[:200]}")
                        elif abs(r.json()["rewards"][0] - expected[text]) > 1e-5:
                            errors.append(f"wrong reward for {text!r}")
                    except httpx.HTTPError as exc:
                        errors.append(repr(exc))

            t0 = time.perf_counter()
            await asyncio.gather(*(worker(k) for k in range(clients)))
            return sent, errors, time.perf_counter() - t0

    sent, errors, elapsed = asyncio.run(main())
    after = http.get("/stats").json()
    batches = after["batches"] - before["batches"]
    logger.info(
        "load test: %d requests from %d clients in %.2f s = %.0f req/s, %d batches (mean %.1f requests/batch)",
        sent,
        clients,
        elapsed,
        sent / elapsed,
        batches,
        sent / max(batches, 1),
    )
    print(f"load test: {sent} requests, {sent / elapsed:.0f} req/s, {batches} batches")
    assert not errors, errors[:5]
    assert sent > 0 and after["requests"] - before["requests"] == sent
    assert after["server_errors"] == before["server_errors"]
    assert_alive(http, scorer)


# ----------------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_batch_size": 2.5}, "max_batch_size"),
        ({"max_wait_ms": -1}, "max_wait_ms"),
        ({"max_wait_ms": float("nan")}, "max_wait_ms"),
        ({"max_items_per_request": 0}, "max_items_per_request"),
        ({"max_body_bytes": 10}, "max_body_bytes"),
        ({"max_queue_items": 10, "max_items_per_request": 20}, "max_queue_items"),
        ({"token": ""}, "token"),
        ({"token": "has space"}, "token"),
        ({"scorer_batch_size": 0}, "scorer_batch_size"),
        ({"log_level": "loud"}, "log_level"),
        ({"normalize": "yes"}, "normalize"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        ServeConfig(**kwargs)


def test_create_app_rejects_non_scorer():
    with pytest.raises(TypeError, match="Scorer"):
        create_app(object())  # type: ignore[arg-type]


def test_serve_with_lead_reward_model(tiny_backbone):
    """The real single reward model (dmoerm.reward_model) behind the server, when it is available."""
    reward_model = pytest.importorskip("dmoerm.reward_model")
    experts = pytest.importorskip("dmoerm.experts")
    model = reward_model.RewardModel.create(
        experts.BackboneConfig(backbone=tiny_backbone, trunk_dtype="float32", max_length=64, num_top_layers=1)
    )
    with ServerThread(create_app(model)) as srv, RewardClient(srv.url) as client:
        got = [o.reward for o in client.score(CONVERSATIONS, RESPONSES)]
        want = [o.reward for o in model.score(CONVERSATIONS, RESPONSES)]
        assert got == pytest.approx(want, abs=1e-5)
        with pytest.raises(RewardServerError) as info:
            client.get_reward(["word " * 200])
        assert info.value.status_code == 413
