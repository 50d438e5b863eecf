"""Labelling at scale from one process: many async API calls in flight, identical questions asked once, and
one SQLite judge cache shared by several processes. A slow OpenAI-compatible judge on 127.0.0.1 (the
rule-based server of test_labelling_api) and real SQLite files, written by real subprocesses."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

from dmoerm.data import Message
from dmoerm.labelling.api import OpenAIJudge
from dmoerm.labelling.cache import JudgeCache
from dmoerm.labelling.judge import JudgeRequest
from dmoerm.labelling.pairs import LabelPair
from dmoerm.labelling.pipeline import label_pairs
from dmoerm.labelling.schema import read_labels
from dmoerm.taxonomy import Capability, Category, Taxonomy
from helpers import http_server
from test_labelling_api import KEY_ENV, SECRET, TAX, FakeServer, _expected_winner, _handler, _pairs

ONE_POINT = Taxonomy(
    name="one",
    categories=(
        Category("chat", "Open conversation.", (Capability("helpfulness", "gives what was asked"),)),
    ),
)


@pytest.fixture()
def slow_server(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    state = FakeServer()
    with http_server(_handler(state)) as base:
        state.url = f"{base}/v1"
        yield state


def _judge(server: FakeServer, cache: JudgeCache | None, concurrency: int = 8) -> OpenAIJudge:
    return OpenAIJudge("rule-judge", server.url, api_key_env=KEY_ENV, cache=cache, concurrency=concurrency,
                       timeout_s=10.0, backoff_base_s=0.001, backoff_max_s=0.01)  # fmt: skip


def test_concurrency_questions_are_in_flight_at_once(slow_server, tmp_path):
    slow_server.delay = 0.2  # seconds per request
    judge = _judge(slow_server, JudgeCache(tmp_path / "c.sqlite"), concurrency=8)
    t = time.perf_counter()
    stats = label_pairs(_pairs(16), ONE_POINT, judge, tmp_path / "l.jsonl", progress=False)
    elapsed = time.perf_counter() - t
    assert slow_server.answers == 32 and stats.asked == 32 and stats.kept == 16  # 16 pairs x 2 orders
    # never over the limit, and most of it used (a loaded machine may start the 8th a moment after one ends)
    assert 4 <= slow_server.max_inflight <= 8, slow_server.max_inflight
    # 32 x 0.2 s = 6.4 s one at a time (measured 7.5 s); 8 at a time is 4 rounds of 0.2 s
    assert 0.8 <= elapsed < 6.4 / 2, elapsed  # measured 1.3 s here (2 shared CPU cores)


def test_identical_questions_in_flight_reach_the_server_once(slow_server, tmp_path):
    slow_server.delay = 0.1
    pairs = _pairs(4)
    swapped = [replace(p, response_a=p.response_b, response_b=p.response_a, uid=p.uid + "s") for p in pairs]
    # Every pair in both orientations (a swapped pair asks exactly the prompts of the original's two orders)
    # and two pairs twice. No cache: only the in-flight sharing can keep the server from a second request.
    judge = _judge(slow_server, cache=None)
    stats = label_pairs(pairs + swapped + pairs[:2], TAX, judge, tmp_path / "l.jsonl", progress=False)
    assert stats.pairs_duplicate == 2 and stats.pairs_judged == 8
    assert slow_server.answers == 4 * 2 * 2  # 4 distinct pairs x 2 capability points x 2 orders
    assert stats.asked == 16 and stats.cached == 16 and judge.stats.shared == 16
    labels = read_labels(tmp_path / "l.jsonl")
    assert len(labels) == 16  # every pair, both orientations, both points
    for lab in labels:
        pair = LabelPair(lab.conversation, lab.response_a, lab.response_b, "chat")
        assert lab.winner == _expected_winner(pair)  # the swapped pairs' winners are swapped too


def test_the_same_request_twice_in_one_call_is_sent_once(slow_server):
    slow_server.delay = 0.05
    req = JudgeRequest(
        (Message("user", "Why?"),), "Because of a long reason.", "No.", None, TAX.categories[0].capabilities
    )
    out = _judge(slow_server, cache=None).judge_sync([req, req])
    assert slow_server.answers == 2  # one per capability point
    assert out[0] == [replace(v, cached=False) for v in out[1]] and all(v.cached for v in out[1])


_LABEL_CHILD = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {tests!r})
    from dmoerm.labelling.api import OpenAIJudge
    from dmoerm.labelling.cache import JudgeCache
    from dmoerm.labelling.pipeline import label_pairs
    from test_labelling_api import KEY_ENV, TAX, _pairs
    judge = OpenAIJudge("rule-judge", {url!r}, api_key_env=KEY_ENV, cache=JudgeCache({cache!r}), concurrency=4)
    while not os.path.exists({go!r}):
        time.sleep(0.002)
    stats = label_pairs(_pairs(16), TAX, judge, sys.argv[1], progress=False)
    print(stats.asked, stats.cached)
    """
)


def _children(code: str, args: list[list[str]], go: Path) -> list[subprocess.CompletedProcess]:
    """Run one child per argument list, all released at once by creating ``go``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    procs = [subprocess.Popen([sys.executable, "-c", code, *a], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for a in args]  # fmt: skip
    time.sleep(0.5)  # both imported and waiting
    go.touch()
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return outs


@pytest.mark.slow
def test_two_labelling_processes_share_one_cache(slow_server, tmp_path):
    slow_server.delay = 0.05
    cache = tmp_path / "shared.sqlite"
    code = _LABEL_CHILD.format(tests=str(Path(__file__).parent), url=slow_server.url, cache=str(cache),
                               go=str(tmp_path / "go"))  # fmt: skip
    outs = _children(code, [[str(tmp_path / "a.jsonl")], [str(tmp_path / "b.jsonl")]], tmp_path / "go")
    a, b = (sorted((tmp_path / f"{x}.jsonl").read_text().splitlines()) for x in "ab")
    assert len(a) == 32 and a == b  # every label in both files, the same labels
    with sqlite3.connect(cache) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0] == 64  # one row per question
    # Each process asks what its cache lookup missed; a question both had in flight at once is sent twice.
    asked = [int(o.stdout.split()[0]) for o in outs]
    assert sum(asked) == slow_server.answers and 64 <= slow_server.answers <= 128
    # a third process after them asks nothing
    stats = label_pairs(_pairs(16), TAX, _judge(slow_server, JudgeCache(cache)), tmp_path / "c.jsonl",
                        progress=False)  # fmt: skip
    assert stats.asked == 0 and stats.cached == 64
    print(f"server answers with two processes: {slow_server.answers} of 64 to 128")


_CACHE_CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    from dmoerm.labelling.cache import JudgeCache
    path, tag, go = sys.argv[1:4]
    other = "b" if tag == "a" else "a"
    cache = JudgeCache(path)
    while not os.path.exists(go):
        time.sleep(0.001)
    t0, seen = time.time(), 0
    for i in range(300):
        cache.put(f"{tag}-{i}", tag, {"i": i, "tag": tag})
        cache.put(f"shared-{i}", tag, {"i": i, "tag": tag})
        if i % 30 == 0:
            cache.put_many([(f"{tag}-batch-{i}-{k}", tag, {"i": i, "k": k}) for k in range(10)])
        seen += cache.get(f"{other}-{i}") is not None
    print(json.dumps({"start": t0, "end": time.time(), "seen": seen}))
    """
)


def test_two_processes_writing_one_cache_leave_it_consistent(tmp_path):
    path, go = tmp_path / "cache.sqlite", tmp_path / "go"
    JudgeCache(path).close()  # created (WAL) before the writers start
    outs = _children(_CACHE_CHILD, [[str(path), tag, str(go)] for tag in "ab"], go)
    runs = [json.loads(o.stdout) for o in outs]
    assert max(r["start"] for r in runs) < min(r["end"] for r in runs), runs  # the writers overlapped
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with JudgeCache(path) as cache:
        assert len(cache) == 2 * 300 + 300 + 2 * 10 * 10
        for tag in "ab":
            assert all(cache.get(f"{tag}-{i}") == {"i": i, "tag": tag} for i in range(300))
            assert cache.get(f"{tag}-batch-270-9") == {"i": 270, "k": 9}
        assert all(cache.get(f"shared-{i}")["i"] == i for i in range(300))  # one writer's row, whole
