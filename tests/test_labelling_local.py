"""The local judge on the tiny random Llama fixture: probabilities from answer-token logits, both orders,
prefix key/value-cache reuse equal to full prompts, the cache, and labels in the schema."""

from __future__ import annotations

import math

import pytest

from dmoerm.data import Message
from dmoerm.labelling.cache import JudgeCache
from dmoerm.labelling.judge import JudgeRequest
from dmoerm.labelling.local import LocalJudge
from dmoerm.labelling.pairs import LabelPair
from dmoerm.labelling.pipeline import label_pairs
from dmoerm.labelling.prompts import PromptBuilder
from dmoerm.labelling.schema import read_labels
from dmoerm.taxonomy import Capability, Category, Taxonomy

CAPS = tuple(Capability(f"cap_{i}", f"definition {i} " * (i + 1)) for i in range(3))
CAT = Category("chat", "Chat.", CAPS)
TAX = Taxonomy("t", (CAT,))


def _requests(n: int = 3) -> list[JudgeRequest]:
    out = []
    for j in range(n):
        conv = (Message("user", "Hello there " * (j + 1)),)
        a, b = "the quick brown fox " * (j + 1), "you are a helpful assistant " * (3 - j)
        out += [JudgeRequest(conv, a, b, CAT, CAPS), JudgeRequest(conv, b, a, CAT, CAPS)]
    return out


def test_probabilities_and_prefix_reuse_match_full_prompts(tiny_backbone):
    reqs = _requests()
    shared = LocalJudge(tiny_backbone, dtype="float32", reuse_prefix=True, batch_size=2)
    full = LocalJudge(tiny_backbone, dtype="float32", reuse_prefix=False, batch_size=4)
    out_s, out_f = shared.score_requests(reqs), full.score_requests(reqs)
    assert len(out_s) == len(reqs) and all(len(v) == len(CAPS) for v in out_s)
    for vs, vf in zip(out_s, out_f, strict=True):
        for s, f in zip(vs, vf, strict=True):
            assert 0.0 < s.p_first < 1.0
            assert s.p_first == pytest.approx(1 / (1 + math.exp(-s.margin)))
            assert s.choice == ("1" if s.margin >= 0 else "2")
            assert s.margin == pytest.approx(f.margin, abs=1e-4)
            assert '"logp"' in s.raw and not s.cached
    assert shared.stats.asked == len(reqs) * len(CAPS)
    assert shared.identity == full.identity  # reuse changes speed, not answers: same cache rows


def test_letter_labels(tiny_backbone):
    judge = LocalJudge(tiny_backbone, dtype="float32", prompts=PromptBuilder(labels=("A", "B")))
    out = judge.score_requests(_requests(1))
    assert all(0 < v.p_first < 1 for vs in out for v in vs)
    assert "labels=AB" in judge.identity


def test_labels_both_orders_and_cache(tiny_backbone, tmp_path):
    pairs = [
        LabelPair((Message("user", f"question {i}"),), f"answer {i} " * (i + 1), "no " * (3 - i), "chat")
        for i in range(3)
    ]
    cache = tmp_path / "c.sqlite"
    judge = LocalJudge(tiny_backbone, dtype="float32", cache=JudgeCache(cache), pairs_per_call=2)
    stats = label_pairs(pairs, TAX, judge, tmp_path / "a.jsonl", consistency="auto", progress=False)
    assert stats.asked == 3 * 3 * 2  # pairs x capabilities x both orders
    assert stats.questions == 9 and stats.methods == {"margin": 9}
    assert stats.kept + stats.dropped_low_margin == 9
    for lab in read_labels(tmp_path / "a.jsonl"):
        assert lab.judge == f"local:{judge.name.split(':', 1)[1]}" and 0.5 <= lab.confidence <= 1
    strict = label_pairs(pairs, TAX, judge, tmp_path / "b.jsonl", consistency="strict", progress=False)
    assert strict.asked == 0 and strict.cached == 18  # the same questions, all from the cache
    assert strict.kept + strict.dropped_inconsistent == 9
    again = LocalJudge(tiny_backbone, dtype="float32", cache=JudgeCache(cache), reuse_prefix=False)
    rerun = label_pairs(pairs, TAX, again, tmp_path / "c.jsonl", progress=False)
    assert rerun.asked == 0 and sorted(read_labels(tmp_path / "c.jsonl"), key=repr) == sorted(
        read_labels(tmp_path / "a.jsonl"), key=repr
    )


def test_max_length_cuts_the_middle(tiny_backbone):
    judge = LocalJudge(
        tiny_backbone, dtype="float32", max_length=128, prompts=PromptBuilder(max_chars_response=None)
    )
    req = JudgeRequest((Message("user", "hi"),), "fox " * 300, "dog", CAT, CAPS[:2])
    out = judge.score_requests([req])
    assert all(0 < v.p_first < 1 for v in out[0])


def test_bad_arguments(tiny_backbone):
    with pytest.raises(ValueError, match="dtype"):
        LocalJudge(tiny_backbone, dtype="int4")
    with pytest.raises(ValueError, match="batch_size"):
        LocalJudge(tiny_backbone, batch_size=0)


def test_reads_logits_in_batches_and_runs_each_prefix_once(tiny_backbone):
    """Prefix reuse: one forward of the prefix per ordered pair, then the questions in batches on its cache;
    without reuse: every full prompt, in batches of ``batch_size``. Nothing is generated."""
    reqs = _requests(2)  # 4 ordered pairs x 3 capability points = 12 questions
    calls: dict[bool, list[tuple[int, int, bool]]] = {}
    for reuse in (True, False):
        judge = LocalJudge(tiny_backbone, dtype="float32", reuse_prefix=reuse, batch_size=2)
        judge.load()

        def no_generate(*a, **k):
            raise AssertionError("the local judge must read logits, not generate")

        judge._model.generate = no_generate
        seen: list[tuple[int, int, bool]] = []

        def hook(module, args, kw, out, seen=seen):
            past = kw.get("past_key_values", kw.get("cache"))
            seen.append((*kw["input_ids"].shape, past is not None))

        judge._model.register_forward_hook(hook, with_kwargs=True)
        judge.score_requests(reqs)
        calls[reuse] = seen
    prefixes = [s for s in calls[True] if not s[2]]
    questions = [s for s in calls[True] if s[2]]
    assert len(prefixes) == 4 and all(s[0] == 1 for s in prefixes)  # one prefix run per ordered pair
    assert sorted(s[0] for s in questions) == [1, 1, 1, 1, 2, 2, 2, 2]  # 3 questions each, batches of 2
    assert max(s[1] for s in questions) < min(s[1] for s in prefixes)  # only the question tokens run
    assert len(calls[False]) == 6 and all(s[0] == 2 and not s[2] for s in calls[False])  # 12 rows by 2
