"""Over-long and odd input, and slow clients, against the reward server over real HTTP on 127.0.0.1 (issue 14
item 6): texts refused by size before any tokeniser runs, lone surrogates answered 4xx naming the field, one
InputTooLongError class, and a deadline for each request's headers and body (raw sockets)."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest

import dmoerm.outputs
import dmoerm.serving
from dmoerm.serving import ServeConfig, create_app
from test_serving import CONVERSATIONS, GOOD_ITEM, RESPONSES, ServerThread, TinyScorer, items_payload

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TIMEOUT_S = 0.6
"""The test server's request_timeout_s."""


@pytest.fixture(scope="module")
def scorer(tiny_backbone) -> TinyScorer:
    return TinyScorer(tiny_backbone, max_length=256)  # text limit 16 * 256 = 4096 characters


@pytest.fixture(scope="module")
def server(scorer):
    config = ServeConfig(max_wait_ms=1, request_timeout_s=TIMEOUT_S)  # default 32 MiB body limit
    with ServerThread(create_app(scorer, config)) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def test_one_input_too_long_error_class():
    assert dmoerm.serving.InputTooLongError is dmoerm.outputs.InputTooLongError


def test_a_lookalike_class_is_not_matched_by_name(tiny_backbone):
    """Only the one class means 413; another ValueError named the same is an ordinary 422."""

    class InputTooLongError(ValueError):  # noqa: N818 - the point is the name
        pass

    class Refusing(TinyScorer):
        def score_texts(self, texts, batch_size=16):
            raise InputTooLongError("not the real class")

    with ServerThread(create_app(Refusing(tiny_backbone), ServeConfig(max_wait_ms=1))) as srv:
        r = httpx.post(f"{srv.url}/get_reward", json={"query": ["hi"]}, timeout=30)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input"


def test_huge_text_is_refused_before_tokenising_and_blocks_nobody(server, http, scorer):
    huge = "word " * 200_000  # 1 MB: tokenising it takes seconds on this CPU
    calls = len(scorer.calls)

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:

            async def timed(coro):
                t0 = time.perf_counter()
                r = await coro
                return r, time.perf_counter() - t0

            return await asyncio.gather(
                timed(client.post("/get_reward", json={"query": [huge]})),
                timed(client.post("/get_reward", json={"query": ["short one"]})),
                timed(client.post("/score", json=items_payload(CONVERSATIONS[:1], [huge]))),
                timed(client.post("/classify", json={"model": "m", "input": huge})),
            )

    (big, t_big), (small, t_small), (item, t_item), (cls, _) = asyncio.run(main())
    assert big.status_code == 413 and big.json()["error"]["code"] == "input_too_long"
    assert "query[0]: 1000000 characters, over the limit of 4096" in big.json()["error"]["message"]
    assert item.status_code == 413 and item.json()["error"]["message"].startswith("items[0]: ")
    assert cls.status_code == 413 and cls.json()["error"]["message"].startswith("input[0]: ")
    assert small.status_code == 200
    assert max(t_big, t_item) < 1.5 and t_small < 1.5
    assert len(scorer.calls) == calls + 1  # only "short one" reached the scorer
    assert http.get("/health").json()["max_text_chars"] == 4096


def test_max_text_chars_can_be_set(scorer):
    with ServerThread(create_app(scorer, ServeConfig(max_text_chars=100))) as srv:
        r = httpx.post(f"{srv.url}/get_reward", json={"query": ["x" * 101]}, timeout=30)
        assert r.status_code == 413 and "over the limit of 100" in r.json()["error"]["message"]
        assert httpx.post(f"{srv.url}/get_reward", json={"query": ["x" * 100]}, timeout=30).status_code == 200


SURROGATES = [
    ("/get_reward", b'{"query": ["ok", "a\\ud800b"]}', "query[1]: lone surrogate"),
    ("/classify", b'{"model": "m", "input": ["\\udfff"]}', "input[0]: lone surrogate"),
    (
        "/score",
        b'{"items": [{"conversation": [{"role": "user", "content": "hi"}], "response": "\\ud83d"}]}',
        "items[0].response: lone surrogate",
    ),
    (
        "/score",
        b'{"items": [{"conversation": [{"role": "user", "content": "x\\ud800"}], "response": "ok"}]}',
        "items[0].conversation[0].content: lone surrogate",
    ),
]


@pytest.mark.parametrize(("path", "body", "message"), SURROGATES)
def test_lone_surrogate_is_a_422_naming_the_field(http, scorer, path, body, message):
    r = http.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["message"].startswith(message)
    # A valid pair (an emoji written as two escapes) is fine.
    ok = http.post("/get_reward", content=b'{"query": ["smile \\ud83d\\ude00"]}')
    assert ok.status_code == 200, ok.text


def _raw(server, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    if data:
        sock.sendall(data)
    return sock


def _closed_within(sock: socket.socket, seconds: float) -> tuple[float, bytes]:
    """Seconds until the server closes ``sock``, and what it sent first."""
    sock.settimeout(seconds)
    t0 = time.perf_counter()
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open over {seconds} s") from None
    finally:
        sock.close()
    return time.perf_counter() - t0, received


SLOW_CLIENTS = {
    "silent": b"",
    "half_headers": b"POST /get_reward HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le",
    "half_body": b"POST /get_reward HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b'Content-Length: 100\r\n\r\n{"query": ["',
}


@pytest.mark.parametrize("kind", list(SLOW_CLIENTS))
def test_slow_client_is_timed_out_while_others_are_served(server, http, scorer, kind):
    slow = _raw(server, SLOW_CLIENTS[kind])
    t0 = time.perf_counter()
    r = http.post("/get_reward", json={"query": ["served meanwhile"]})
    assert r.status_code == 200 and time.perf_counter() - t0 < TIMEOUT_S
    waited, received = _closed_within(slow, TIMEOUT_S + 3)
    assert waited < TIMEOUT_S + 1.5
    assert received.startswith(b"HTTP/1.1 408 ")
    assert json.loads(received.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    assert http.get("/health").status_code == 200


def test_trickling_client_is_cut_at_the_deadline(server):
    """Sending a byte now and then does not extend the deadline (it runs from the request's first byte)."""
    sock = _raw(server, b"POST /get_reward HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    t0 = time.perf_counter()
    try:
        for _ in range(int(4 * TIMEOUT_S / 0.1)):
            sock.sendall(b"X")
            time.sleep(0.1)
    except OSError:
        pass  # closed by the server: what we want
    assert time.perf_counter() - t0 < TIMEOUT_S + 1.0
    sock.close()


def test_slow_scoring_is_not_cut_by_the_deadline(tiny_backbone):
    slow = TinyScorer(tiny_backbone)
    slow.delay_s = 2 * TIMEOUT_S
    config = ServeConfig(max_wait_ms=1, request_timeout_s=TIMEOUT_S)
    with ServerThread(create_app(slow, config)) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/score", json={"items": [GOOD_ITEM]})
        assert r.status_code == 200, r.text
        again = c.post("/get_reward", json={"query": [RESPONSES[0]]})  # same keep-alive connection
        assert again.status_code == 200


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_text_chars": 3}, "max_text_chars"),
        ({"max_text_chars": 2.5}, "max_text_chars"),
        ({"request_timeout_s": 0}, "request_timeout_s"),
        ({"request_timeout_s": "5"}, "request_timeout_s"),
        ({"keep_alive_s": -1}, "keep_alive_s"),
    ],
)
def test_new_limits_are_checked(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ServeConfig(**kwargs)
