"""Tests of dmoerm.evaluation: exact numbers on hand-made records, bootstrap, ensembles, best-of-n, reports."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from dmoerm.data import Message, PreferenceRecord
from dmoerm.evaluation import (
    EnsembleRewardOutput,
    EnsembleScorer,
    EvalResult,
    bon_curve,
    bon_expected,
    bon_kl,
    bon_weights,
    bootstrap_ci,
    combine_rewards,
    comparison_table,
    compute_metrics,
    evaluate,
    length_table,
    load_eval,
    pairwise_agreement,
    pearson,
    plot_bon_curves,
    spearman,
    write_eval,
)
from dmoerm.outputs import RewardOutput, Scorer

CONV = (Message("user", "q"),)


def rec(responses: tuple[str, ...], ranks: tuple[int, ...], category: str | None) -> PreferenceRecord:
    return PreferenceRecord(conversation=CONV, responses=responses, ranks=ranks, category=category)


def hand_set() -> tuple[list[PreferenceRecord], list[list[float]]]:
    """Six records, two categories; see the expected numbers in the tests below."""
    records = [
        rec(("a", "bbb"), (0, 1), "chat"),  # better is shorter; reward agrees -> 1
        rec(("cccc", "dd"), (0, 1), "chat"),  # better is longer; reward tie -> 0.5
        rec(("e", "ff"), (0, 0), "chat"),  # human tie: excluded, counted
        rec(("x", "yy", "zzz"), (0, 1, 2), "code"),  # 3 pairs, all better-shorter; 2 of 3 agree; best-of-n ok
        rec(("pp", "qq", "r"), (0, 0, 1), "code"),  # 1 human tie, 2 better-longer pairs: 0 and 0.5; bon fails
        rec(("ab", "cd"), (1, 0), "code"),  # equal lengths; better is index 1; agrees -> 1
    ]
    rewards = [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [3.0, 1.0, 2.0], [1.0, 2.0, 2.0], [0.0, 1.0]]
    return records, rewards


# ---------------------------------------------------------------------------------------------- agreement


def test_pairwise_agreement_exact():
    records, rewards = hand_set()
    assert pairwise_agreement(rewards, records) == pytest.approx(5 / 8)
    # a constant scorer gets exactly one half
    assert pairwise_agreement([[0.0] * len(r.responses) for r in records], records) == 0.5
    assert math.isnan(pairwise_agreement([[1.0, 2.0]], [records[2]]))  # only a human tie


def test_compute_metrics_overall_and_per_category():
    records, rewards = hand_set()
    res = compute_metrics(rewards, records, n_resamples=200)
    o = res.overall
    assert o.category == "all"
    assert o.n_records == 6 and o.n_responses == 14
    assert o.agreement.n == 8 and o.agreement.n_records == 5
    assert o.agreement.value == pytest.approx(5 / 8)
    assert o.human_ties_excluded == 2
    assert res.categories == ["chat", "code"]
    chat, code = res.category("chat"), res.category("code")
    assert (chat.n_records, chat.agreement.n, chat.human_ties_excluded) == (3, 2, 1)
    assert chat.agreement.value == pytest.approx(0.75)
    assert (code.n_records, code.agreement.n, code.human_ties_excluded) == (3, 6, 1)
    assert code.agreement.value == pytest.approx(3.5 / 6)
    # best-of-n: only the ranked lists with 3 responses
    assert chat.best_of_n is None
    assert o.best_of_n is not None and code.best_of_n is not None
    assert (o.best_of_n.n, o.best_of_n.value) == (2, 0.5)
    assert code.best_of_n.value == 0.5


def test_length_metrics_exact():
    records, rewards = hand_set()
    ln = compute_metrics(rewards, records, n_resamples=200).overall.length
    assert ln.longer_wins_baseline.value == pytest.approx(3.5 / 8)
    assert ln.longer_wins_baseline.n == 8
    assert (ln.when_shorter_better.n, ln.when_shorter_better.value) == (4, 0.75)
    assert ln.when_longer_better.n == 3
    assert ln.when_longer_better.value == pytest.approx(1 / 3)
    assert ln.equal_length_pairs == 1
    flat_r = [x for r in rewards for x in r]
    flat_l = [len(s) for r in records for s in r.responses]
    assert ln.pearson_chars == pytest.approx(np.corrcoef(flat_r, flat_l)[0, 1])
    assert ln.pearson_tokens is None and ln.spearman_tokens is None
    chat = compute_metrics(rewards, records, n_resamples=0).category("chat").length
    assert (chat.when_shorter_better.n, chat.when_shorter_better.value) == (1, 1.0)
    assert (chat.when_longer_better.n, chat.when_longer_better.value) == (1, 0.5)
    assert chat.longer_wins_baseline.value == 0.5


def test_token_lengths_and_category_override():
    records, rewards = hand_set()
    tokens = [[len(s) * 2 for s in r.responses] for r in records]
    res = compute_metrics(rewards, records, categories=["x"] * 5 + [None], token_lengths=tokens)
    assert res.category_source == "given"
    assert res.categories == ["code", "x"]  # a None entry falls back to the record's category
    assert res.category("x").agreement.n == 7
    ln = res.overall.length
    assert ln.pearson_tokens == pytest.approx(ln.pearson_chars)
    assert ln.spearman_tokens == pytest.approx(ln.spearman_chars)
    nocat = compute_metrics([[1.0, 0.0]], [rec(("a", "b"), (0, 1), None)])
    assert nocat.categories == ["uncategorized"]


def test_bad_inputs_are_named():
    records, rewards = hand_set()
    with pytest.raises(ValueError, match=r"rewards\[1\]"):
        compute_metrics([rewards[0], [1.0]] + rewards[2:], records)
    with pytest.raises(ValueError, match="not finite"):
        compute_metrics([[math.nan, 0.0]], records[:1])
    with pytest.raises(ValueError, match="categories"):
        compute_metrics(rewards, records, categories=["a"])


def test_correlations():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    # spearman with ties: average ranks
    x, y = [1, 2, 2, 3], [10, 20, 30, 40]
    rx, ry = np.array([1, 2.5, 2.5, 4]), np.array([1, 2, 3, 4])
    assert spearman(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_contains_estimate_and_shrinks():
    rng = np.random.default_rng(0)
    widths = []
    for n in (100, 10_000):
        counts = rng.integers(1, 4, size=n).astype(float)
        sums = rng.binomial(counts.astype(int), 0.7).astype(float)
        point = sums.sum() / counts.sum()
        lo, hi = bootstrap_ci(sums, counts, n_resamples=1000, seed=0)
        assert lo <= point <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 5
    # deterministic with a fixed seed; plain mean without counts
    assert bootstrap_ci([0, 1, 1, 0, 1], seed=3) == bootstrap_ci([0, 1, 1, 0, 1], seed=3)
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)
    assert all(math.isnan(v) for v in bootstrap_ci([]))


def test_estimates_have_intervals():
    records, rewards = hand_set()
    a = compute_metrics(rewards, records, n_resamples=500).overall.agreement
    assert 0.0 <= a.ci_low <= a.value <= a.ci_high <= 1.0


# ---------------------------------------------------------------------------------------------- ensembles


def test_ensemble_rules_numpy_and_torch():
    scores = [[1.0, 2.0], [3.0, 6.0]]
    np.testing.assert_allclose(combine_rewards(scores, "mean"), [2.0, 4.0])
    np.testing.assert_allclose(combine_rewards(scores, "min"), [1.0, 2.0])
    np.testing.assert_allclose(combine_rewards(scores, "wco"), [1.0, 2.0])
    # population variance: [1, 4]; 0.5 * var subtracted
    np.testing.assert_allclose(combine_rewards(scores, "uwo", lam=0.5), [1.5, 2.0])
    np.testing.assert_allclose(combine_rewards(scores, "uwo", lam=1.0), [1.0, 0.0])
    torch = pytest.importorskip("torch")
    t = torch.tensor(scores)
    out = combine_rewards(t, "uwo", lam=0.5)
    assert isinstance(out, torch.Tensor)
    assert out.tolist() == pytest.approx([1.5, 2.0])
    assert combine_rewards(t, "min").tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="unknown ensemble rule"):
        combine_rewards(scores, "median")


class LengthScorer:
    """A deterministic fake reward model: reward = sign * length of the response."""

    def __init__(self, sign: float = 1.0, max_length: int = 512, category: str | None = None) -> None:
        self.sign = sign
        self.max_length = max_length
        self.category = category
        self.calls = 0

    def score(self, conversations, responses, batch_size=16):
        self.calls += 1
        assert len(conversations) == len(responses)
        return [RewardOutput(reward=self.sign * len(r), category=self.category) for r in responses]

    def score_texts(self, texts, batch_size=16):
        return [self.sign * len(t) for t in texts]


def test_ensemble_scorer():
    a, b = LengthScorer(1.0, 256, "chat"), LengthScorer(3.0, 128, "chat")
    ens = EnsembleScorer([a, b], rule="uwo", lam=0.25)
    assert isinstance(ens, Scorer)
    assert ens.max_length == 128
    outs = ens.score([list(CONV)] * 2, ["ab", "abcd"])
    assert isinstance(outs[0], EnsembleRewardOutput)
    # members [2, 6] -> mean 4, var 4 -> 3; members [4, 12] -> mean 8, var 16 -> 4
    assert [o.reward for o in outs] == pytest.approx([3.0, 4.0])
    assert outs[1].member_rewards == [4.0, 12.0]
    assert outs[0].category == "chat" and outs[0].capability_scores == {}
    assert EnsembleScorer([a, b], rule="min").score_texts(["abc"]) == [3.0]
    mixed = EnsembleScorer([a, LengthScorer(1.0, 64, "code")]).score([list(CONV)], ["x"])
    assert mixed[0].category is None


# ---------------------------------------------------------------------------------------------- best-of-n


def test_bon_kl():
    assert bon_kl(1) == 0.0
    assert bon_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert bon_kl(4) == pytest.approx(math.log(4) - 0.75)
    np.testing.assert_allclose(bon_kl([1, 2]), [0.0, math.log(2) - 0.5])
    with pytest.raises(ValueError):
        bon_kl(0)


def test_bon_weights():
    np.testing.assert_allclose(bon_weights(2, 3), [0.0, 1 / 3, 2 / 3])
    np.testing.assert_allclose(bon_weights(1, 4), [0.25] * 4)
    big = bon_weights(64, 20_000)
    assert big.sum() == pytest.approx(1.0) and np.all(np.isfinite(big))
    i = 100
    assert big[i - 1] == pytest.approx(math.comb(i - 1, 63) / math.comb(20_000, 64), rel=1e-9)


def test_bon_expected_by_hand():
    proxy = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    gold = np.array([[10.0, 20.0, 30.0], [1.0, 2.0, 3.0]])
    # row 1: n=1 -> mean 20; n=2: subsets {0,1}->20, {0,2}->30, {1,2}->30 -> 80/3; n=3 -> 30
    # row 2 (proxy reversed): n=1 -> 2; n=2: {0,1}->1, {0,2}->1, {1,2}->2 -> 4/3; n=3 -> 1
    out = bon_expected(proxy, gold, [1, 2, 3])
    np.testing.assert_allclose(out, [(20 + 2) / 2, (80 / 3 + 4 / 3) / 2, (30 + 1) / 2])
    # proxy ties are broken at random in expectation
    np.testing.assert_allclose(bon_expected(np.array([[1.0, 1.0]]), np.array([[0.0, 10.0]]), [1, 2]), [5, 5])


def test_bon_expected_matches_brute_force_with_ties():
    rng = np.random.default_rng(1)
    proxy = rng.integers(0, 3, size=(4, 6)).astype(float)  # many ties
    gold = rng.normal(size=(4, 6))
    for n in range(1, 7):
        want = []
        for p, g in zip(proxy, gold, strict=True):
            vals = []
            for sub in itertools.combinations(range(6), n):
                top = max(p[j] for j in sub)
                vals.append(np.mean([g[j] for j in sub if p[j] == top]))
            want.append(np.mean(vals))
        assert bon_expected(proxy, gold, [n])[0] == pytest.approx(np.mean(want))


def test_bon_curve_and_plots(tmp_path):
    rng = np.random.default_rng(0)
    gold = rng.normal(size=(20, 16))
    lengths = rng.integers(10, 100, size=(20, 16)).astype(float)
    proxy = gold + lengths / 50.0
    curve = bon_curve(proxy, gold, lengths=lengths)
    assert curve.ns == [1, 2, 4, 8, 16]
    assert curve.kl[0] == 0.0 and curve.kl == sorted(curve.kl)
    assert curve.gold[0] == pytest.approx(gold.mean())
    assert curve.length is not None and curve.length[-1] > curve.length[0]
    assert curve.proxy == sorted(curve.proxy)
    other = bon_curve(gold, gold, ns=[1, 4, 16], lengths=lengths)
    for y in ("gold", "length"):
        path = plot_bon_curves({"length-biased": curve, "gold": other}, tmp_path / "plots" / f"{y}.png", y=y)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no length"):
        plot_bon_curves({"x": bon_curve(proxy, gold)}, tmp_path / "bad.png", y="length")


# ---------------------------------------------------------------------------------------------- driver, reports


def test_evaluate_with_fake_scorer(tmp_path):
    records, _ = hand_set()
    scorer = LengthScorer()
    res = evaluate(scorer, records, batch_size=4, system="length", n_resamples=200)
    assert scorer.calls == 1
    # reward = length, so agreement equals the longer-wins baseline
    assert res.overall.agreement.value == pytest.approx(3.5 / 8)
    assert res.overall.agreement.value == res.overall.length.longer_wins_baseline.value
    assert res.overall.length.pearson_chars == pytest.approx(1.0)
    assert res.overall.length.when_shorter_better.value == 0.0
    assert res.overall.length.when_longer_better.value == 1.0
    t = res.throughput
    assert t is not None and t.seconds > 0 and t.batch_size == 4
    assert t.responses_per_second == pytest.approx(14 / t.seconds)
    assert t.pairs_per_second == pytest.approx(8 / t.seconds)
    routed = evaluate(LengthScorer(category="routed"), records, categories="scorer", n_resamples=0)
    assert routed.category_source == "scorer" and routed.categories == ["routed"]

    json_path, md_path = write_eval(res, tmp_path / "out")
    data = json.loads(json_path.read_text())
    assert data["overall"]["agreement"]["n"] == 8
    assert data["system"] == "length"
    back = load_eval(tmp_path / "out")
    assert back.to_dict() == res.to_dict()
    assert md_path.read_text() == res.to_markdown()


def test_markdown_numbers():
    records, rewards = hand_set()
    res = compute_metrics(rewards, records, n_resamples=300, system="hand")
    md = res.to_markdown()
    a = res.overall.agreement
    lines = md.splitlines()
    all_row = next(line for line in lines if line.startswith("| **all**"))
    cells = [c.strip() for c in all_row.strip("|").split("|")]
    assert cells[:5] == ["**all**", "6", "8", "2", "62.5"]
    assert cells[5] == f"[{100 * a.ci_low:.1f}, {100 * a.ci_high:.1f}]"
    assert cells[6] == "43.8"  # longer-wins baseline 3.5 / 8
    assert cells[7].startswith("75.0 [") and cells[7].endswith("(n=4)")
    assert cells[8].startswith("33.3 [") and cells[8].endswith("(n=3)")
    assert cells[9] == "1"
    chat_row = next(line for line in lines if line.startswith("| chat |") and "| 75.0 |" in line)
    assert "| 3 | 2 | 1 | 75.0 |" in chat_row
    assert "## Best-of-n accuracy" in md and "| code | 2 | 50.0 |" in md
    assert "## Throughput" not in md  # no timing without a real run
    assert "Evaluation: hand" in md


def test_comparison_table():
    records, rewards = hand_set()
    good = compute_metrics(rewards, records, n_resamples=100)
    const = compute_metrics([[0.0] * len(r.responses) for r in records], records, n_resamples=100)
    table = comparison_table({"hand": good, "constant": const})
    lines = table.splitlines()
    assert lines[0] == "| system | overall (n=8) | chat (n=2) | code (n=6) |"
    assert lines[2].startswith("| hand | 62.5 [") and lines[2].endswith("| 75.0 | 58.3 |")
    assert lines[3].startswith("| constant | 50.0 [") and lines[3].endswith("| 50.0 | 50.0 |")
    cols = comparison_table({"hand": good, "constant": const}, systems_as="columns").splitlines()
    assert cols[0] == "| category | hand | constant |"
    assert cols[3] == "| chat (n=2) | 75.0 | 50.0 |"
    # different category sets per system: counts move into the cells, missing categories show "-"
    routed = compute_metrics(rewards, records, categories=["chat"] * 6, n_resamples=0)
    mixed = comparison_table({"hand": good, "routed": routed})
    assert "| routed |" in mixed and "75.0 (n=2)" in mixed and "62.5 (n=8)" in mixed
    assert mixed.splitlines()[3].endswith("| -" + " |")


def test_length_table():
    records, rewards = hand_set()
    tokens = [[2 * len(s) for s in r.responses] for r in records]
    good = compute_metrics(rewards, records, token_lengths=tokens, n_resamples=100)
    const = compute_metrics([[0.0] * len(r.responses) for r in records], records, n_resamples=100)
    lines = length_table({"hand": good, "constant": const}).splitlines()
    assert lines[0].startswith("| system | agreement | longer-wins baseline | agreement when shorter wins |")
    hand = [c.strip() for c in lines[2].strip("|").split("|")]
    assert hand[0] == "hand"
    assert hand[1].startswith("62.5 [") and hand[1].endswith("(n=8)")
    assert hand[2].startswith("43.8 [") and hand[2].endswith("(n=8)")  # longer wins on 3.5 of 8 pairs
    assert hand[3].startswith("75.0 [") and hand[3].endswith("(n=4)")
    assert hand[4].startswith("33.3 [") and hand[4].endswith("(n=3)")
    ln = good.overall.length
    assert hand[5:] == [
        f"{ln.pearson_chars:+.3f}",
        f"{ln.pearson_chars_within_prompt:+.3f}",
        f"{ln.pearson_tokens:+.3f}",
    ]
    constant = [c.strip() for c in lines[3].strip("|").split("|")]
    # a constant reward: every length-controlled agreement is one half, correlations undefined, no tokens given
    assert [c.split(" ")[0] for c in (constant[1], constant[3], constant[4])] == ["50.0", "50.0", "50.0"]
    assert constant[5:] == ["-", "-", "-"]
    assert "| constant |" in length_table({"constant": const}, category="chat")
    assert length_table({"hand": good}, category="nope").splitlines()[2] == "| hand |" + " - |" * 7
    with pytest.raises(ValueError, match="no results"):
        length_table({})


def test_within_prompt_correlation_by_hand():
    # two prompts: within each, the longer response has the higher reward; across prompts, the opposite
    records = [rec(("a", "aaa"), (1, 0), None), rec(("bbbbbb", "bbbbbbbb"), (1, 0), None)]
    rewards = [[10.0, 11.0], [0.0, 1.0]]
    ln = compute_metrics(rewards, records, n_resamples=0).overall.length
    assert ln.pearson_chars_within_prompt == pytest.approx(1.0)
    assert ln.pearson_chars < 0
    assert ln.when_longer_better.value == 1.0 and ln.when_shorter_better.n == 0


def test_eval_result_json_is_strict():
    records, rewards = hand_set()
    res = compute_metrics(rewards, records, n_resamples=0)  # no CIs: NaN -> null
    text = res.to_json()
    assert "NaN" not in text
    assert json.loads(text)["overall"]["agreement"]["ci_low"] is None
    assert EvalResult.from_json(text).overall.agreement.value == pytest.approx(5 / 8)
