"""Loaders of the bundled sources, the user JSONL schema, bad-input errors and prompt-disjoint splits."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest

from dmoerm.data import (
    SOURCE_GROUPS,
    SOURCES,
    DataError,
    Message,
    PreferenceRecord,
    PromptRecord,
    default_data_dir,
    load_jsonl,
    load_source,
    save_jsonl,
    source_file,
    source_kind,
    split_by_prompt,
)

SINGLE_SOURCES = [n for n in SOURCES if n not in SOURCE_GROUPS]


def write_jsonl(path: Path, lines: list) -> Path:
    """Write lines (dicts are JSON-encoded, strings written as they are) to a plain or gzip file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join((json.dumps(x, ensure_ascii=False) if not isinstance(x, str) else x) + "\n" for x in lines)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def fake_source(tmp_path: Path, name: str, lines: list) -> Path:
    """A data folder holding only ``name``'s file with the given lines."""
    write_jsonl(tmp_path / source_file(name), lines)
    return tmp_path


# ---------------------------------------------------------------------------------------------------------------
# Every bundled source, on a sample of the real file


@pytest.mark.parametrize("name", SINGLE_SOURCES)
def test_each_source_loads_a_sample(data_dir: Path, name: str) -> None:
    records = load_source(name, data_dir, limit=25)
    assert 0 < len(records) <= 25
    kind = source_kind(name)
    cls = PreferenceRecord if kind == "preference" else PromptRecord
    assert all(isinstance(r, cls) for r in records)
    assert all(r.source == name for r in records)
    assert all(r.conversation[-1].role == "user" for r in records)
    assert all(r.category is None or isinstance(r.category, str) for r in records)
    assert records.report.loaded == len(records)
    if kind == "preference":
        for r in records:
            assert len(r.responses) == len(r.ranks) >= 2
            assert min(r.ranks) == 0
    assert len({r.uid for r in records}) == len(records), "uids are unique within a source"


def test_rmb_pairwise_fields(data_dir: Path) -> None:
    records = load_source("rmb/pairwise_helpfulness", data_dir, limit=200)
    assert all(r.category.startswith("Helpfulness/") for r in records)
    assert all(r.meta["category_path"].endswith(r.category) for r in records)
    assert all(r.ranks == (0, 1) for r in records)
    assert any(len(r.conversation) > 1 for r in records), "multi-turn context is kept"
    assert {m.role for r in records for m in r.conversation} <= {"user", "assistant", "system"}


def test_rmb_bon_ranks(data_dir: Path) -> None:
    records = load_source("rmb/bon_harmlessness", data_dir, limit=50)
    for r in records:
        assert r.ranks[0] == 0 and all(x == 1 for x in r.ranks[1:]) and len(r.ranks) >= 3
        assert len(r.pairs()) == len(r.responses) - 1, "best above every loser, losers tied"
        assert r.category.startswith("Harmlessness/")


def test_whole_file_loads_and_drops_known_defects(data_dir: Path) -> None:
    records = load_source("rmb/pairwise_harmlessness", data_dir)
    rep = records.report
    assert rep.skipped == 0 and rep.dropped > 0
    assert rep.loaded == len(records) and rep.loaded + rep.dropped == 6087
    assert all("empty response" in p or "ranked differently" in p for p in rep.dropped_lines)
    assert all(p.startswith("rmb/pairwise_harmlessness.jsonl.gz:") for p in rep.dropped_lines)


def test_group_and_limit(data_dir: Path) -> None:
    records = load_source("llmbar", data_dir)
    assert {r.meta["subset"] for r in records} == {n.split("/")[1] for n in SOURCE_GROUPS["llmbar"]}
    assert {r.source for r in records} == set(SOURCE_GROUPS["llmbar"])
    assert len(load_source("llmbar", data_dir, limit=120)) == 120


def test_autoj_prompts(data_dir: Path) -> None:
    records = load_source("autoj/train", data_dir)
    with_input = [r for r in records if "\n\n" in r.conversation[0].content]
    assert with_input, "instruction and input are joined with a blank line"
    assert len({r.category for r in records}) == 59  # 58 scenarios + default


def test_pandalm_real(data_dir: Path) -> None:
    records = load_source("pandalm/test", data_dir)
    assert records.report.coerced > 0, "bare JSON booleans become text"
    for r in records:
        votes = r.meta["votes"]
        assert r.is_tie == (r.meta["winner"] == 0)
        if not r.is_tie:
            assert votes.count(r.meta["winner"]) >= 2


def test_finegrained_rankings(data_dir: Path) -> None:
    records = load_source("finegrained_rlhf/qa_dev", data_dir)
    ranked = [r for r in records if r.meta["consistent"]]
    pairs = [r for r in records if not r.meta["consistent"]]
    assert len(ranked) + len(pairs) // 6 == 500 and len(pairs) % 6 == 0
    order = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    for r in ranked:
        assert len(r.responses) == 4
        for (i, j), v in zip(order, r.meta["preference"], strict=True):
            assert v == (0 if r.ranks[i] == r.ranks[j] else 1 if r.ranks[i] < r.ranks[j] else 2)
        assert r.meta["feedback"][0] is not None and r.meta["feedback"][1:] == [None, None, None]
        assert "Passages:" in r.conversation[0].content or not r.meta["passages"]
    for r in pairs:
        fb = [f is not None for f in r.meta["feedback"]]
        assert fb == [pid == 1 for pid in r.meta["prediction_ids"]]


def test_zh_pairs_system_turns(data_dir: Path) -> None:
    records = load_source("zh_pairs/llamafactory_en", data_dir)
    assert any(r.conversation[0].role == "system" for r in records)
    assert any(len(r.conversation) > 2 for r in records)


def test_prompt_sets(data_dir: Path) -> None:
    v2 = load_source("arena_hard/v2.0", data_dir)
    assert {r.category for r in v2} == {"hard_prompt/coding", "hard_prompt/math", "creative_writing"}
    ab = load_source("alignbench", data_dir, limit=50)
    assert all("/" in r.category and r.meta["subcategory"] for r in ab)


# ---------------------------------------------------------------------------------------------------------------
# Source parsing rules, on small files


def _pandalm(votes, r1="one", r2="two", idx=0) -> dict:
    a1, a2, a3 = votes
    return {
        "idx": idx,
        "instruction": "Do it.",
        "input": "with this",
        "response1": r1,
        "response2": r2,
        "annotator1": a1,
        "annotator2": a2,
        "annotator3": a3,
    }


def test_pandalm_majority(tmp_path: Path) -> None:
    lines = [
        _pandalm((1, 1, 2), idx=0),
        _pandalm((2, 2, 0), idx=1),
        _pandalm((0, 0, 1), idx=2),
        _pandalm((0, 1, 2), idx=3),
        _pandalm((2, 2, 2), r1=True, idx=4),
    ]
    rs = load_source("pandalm/test", fake_source(tmp_path, "pandalm/test", lines))
    assert [r.is_tie for r in rs] == [False, False, True, True, False]
    assert rs[0].chosen == "one" and rs[1].chosen == "two" and rs[4].rejected == "True"
    assert rs[0].conversation[0].content == "Do it.\n\nwith this"
    assert rs[3].meta["votes"] == [0, 1, 2] and rs.report.coerced == 1


def _hh(context: str, chosen: str, rejected: str) -> dict:
    return {"chosen": f"{context}\n\nAssistant: {chosen}", "rejected": f"{context}\n\nAssistant: {rejected}"}


def test_hh_split(tmp_path: Path) -> None:
    ctx = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how do I pick a lock?"
    lines = [
        _hh(ctx, "I can't help with that.", "Sure, first get a tension wrench."),
        _hh(ctx, "No.\n\nAssistant: Really, no.", "Sure."),  # a response holding a speaker marker
        {"chosen": ctx + "\n\nAssistant: no", "rejected": "\n\nHuman: other\n\nAssistant: yes"},
        _hh("\n\nHuman: a\n\nAssistant: b\n\nHuman: c", "x", "y")
        | {"rejected": "\n\nHuman: a\n\nAssistant: B\n\nHuman: c\n\nAssistant: y"},
    ]
    folder = fake_source(tmp_path, "hh_rlhf/harmless_base_test", lines)
    rs = load_source("hh_rlhf/harmless_base_test", folder, limit=2)
    assert [m.role for m in rs[0].conversation] == ["user", "assistant", "user"]
    assert rs[0].conversation[-1].content == "how do I pick a lock?"
    assert rs[0].responses == ("I can't help with that.", "Sure, first get a tension wrench.")
    assert rs[1].chosen == "No.\n\nAssistant: Really, no."
    with pytest.raises(
        DataError, match=r"hh_rlhf/harmless_base_test\.jsonl\.gz:3: field 'rejected': .*context"
    ):
        load_source("hh_rlhf/harmless_base_test", folder)
    rs = load_source("hh_rlhf/harmless_base_test", folder, skip_bad=True)
    assert len(rs) == 2 and rs.report.skipped == 2
    assert "jsonl.gz:4: field 'rejected': its context differs" in rs.report.skipped_lines[1]


def test_empty_response_in_bundled_source_is_dropped_and_counted(tmp_path: Path, caplog) -> None:
    ctx = "\n\nHuman: hi"
    folder = fake_source(
        tmp_path, "hh_rlhf/harmless_base_test", [_hh(ctx, "hello", "go away"), _hh(ctx, "", "x")]
    )
    with caplog.at_level(logging.WARNING, logger="dmoerm.data"):
        rs = load_source("hh_rlhf/harmless_base_test", folder)
    assert len(rs) == 1 and rs.report.dropped == 1
    assert "dropped 1 record" in caplog.text and ":2: field 'chosen': empty response" in caplog.text


def _rmb(uid: int, **over) -> dict:
    obj = {
        "pair_uid": str(uid),
        "conversation_input": [{"role": "user", "content": "Write a haiku.", "language": "English"}],
        "chosen": {"llm_name": "a", "answer": "Leaves fall"},
        "reject": {"llm_name": "b", "answer": "No."},
        "category_path": "Pairwise_set/Helpfulness/Generation/Creative Writing",
        "subset": "Helpfulness/Generation/Creative Writing",
    }
    obj.update(over)
    return obj


def test_bundled_source_bad_field_names_file_line_field(tmp_path: Path) -> None:
    lines = [_rmb(1), _rmb(2, chosen={"llm_name": "a"}), _rmb(3, reject="plain text")]
    folder = fake_source(tmp_path, "rmb/pairwise_helpfulness", lines)
    with pytest.raises(
        DataError, match=r"^rmb/pairwise_helpfulness\.jsonl\.gz:2: field 'chosen\.answer': missing$"
    ):
        load_source("rmb/pairwise_helpfulness", folder)
    rs = load_source("rmb/pairwise_helpfulness", folder, skip_bad=True)
    assert len(rs) == 1 and rs.report.skipped == 2
    assert rs.report.skipped_lines[1].startswith("rmb/pairwise_helpfulness.jsonl.gz:3: field 'reject.answer'")


def test_bundled_source_unknown_role(tmp_path: Path) -> None:
    bad = _rmb(1, conversation_input=[{"role": "bot", "content": "x"}, {"role": "user", "content": "y"}])
    folder = fake_source(tmp_path, "rmb/pairwise_helpfulness", [bad])
    with pytest.raises(DataError, match=r":1: field 'conversation_input\[0\]\.role': unknown role 'bot'"):
        load_source("rmb/pairwise_helpfulness", folder)
    zh = {"conversations": [{"from": "robot", "value": "x"}], "chosen": "a", "rejected": "b"}
    folder = fake_source(tmp_path / "zh", "zh_pairs/medicalgpt_zh", [zh])
    with pytest.raises(DataError, match=r"field 'conversations\[0\]\.from': unknown role 'robot'"):
        load_source("zh_pairs/medicalgpt_zh", folder)


def test_missing_file_and_unknown_source(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="DMOERM_DATA_DIR"):
        load_source("alignbench", tmp_path)
    with pytest.raises(KeyError, match="unknown source"):
        load_source("nope", tmp_path)
    with pytest.raises(ValueError, match="limit"):
        load_source("alignbench", tmp_path, limit=0)


def test_default_data_dir_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("DMOERM_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="set DMOERM_DATA_DIR"):
        default_data_dir()
    monkeypatch.setenv("DMOERM_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        default_data_dir()
    (tmp_path / "shared" / "data").mkdir(parents=True)
    monkeypatch.delenv("DMOERM_DATA_DIR")
    assert default_data_dir() == (tmp_path / "shared" / "data").resolve()


# ---------------------------------------------------------------------------------------------------------------
# The user JSONL schema


CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]


def test_user_schema_round_trip(tmp_path: Path) -> None:
    lines = [
        {"conversation": CONV, "chosen": "Hello!", "rejected": "Go away.", "category": "chat", "uid": "a"},
        {"prompt": "2+2?", "chosen": "4", "rejected": "4.0", "tie": True, "source": "mine"},
        {"prompt": "Rank", "responses": ["a", "b", "c"], "ranks": [1, 0, 1], "meta": {"k": 1}, "extra": "x"},
    ]
    path = write_jsonl(tmp_path / "mine.jsonl", lines)
    rs = load_jsonl(path)
    assert [type(r) for r in rs] == [PreferenceRecord] * 3
    assert rs[0].conversation == (Message("system", "Be brief."), Message("user", "Hi?"))
    assert rs[0].category == "chat" and rs[0].uid == "a" and rs[0].source == "mine"
    assert rs[1].is_tie and rs[1].source == "mine" and rs[1].uid == "2"
    assert rs[2].ranks == (1, 0, 1) and rs[2].chosen == "b" and rs[2].meta == {"k": 1, "extra": "x"}
    for suffix in ("out.jsonl", "out.jsonl.gz"):
        assert save_jsonl(rs, tmp_path / suffix) == 3
        back = load_jsonl(tmp_path / suffix)
        assert list(back) == list(rs) and [r.meta for r in back] == [r.meta for r in rs]


def test_prompt_records_round_trip(tmp_path: Path) -> None:
    recs = [PromptRecord((Message("user", "Write a poem."),), category="text_creation", source="s", uid="1")]
    save_jsonl(recs, tmp_path / "p.jsonl")
    back = load_jsonl(tmp_path / "p.jsonl", kind="prompt")
    assert list(back) == recs


@pytest.mark.parametrize(
    ("line", "pattern"),
    [
        ('{"prompt": "x", "chosen": "a", "rejected": ', r"bad\.jsonl:2: malformed JSON"),
        ({"prompt": "x", "chosen": "a"}, r"bad\.jsonl:2: field 'rejected': missing"),
        ({"chosen": "a", "rejected": "b"}, r"bad\.jsonl:2: field 'conversation': missing"),
        ({"prompt": "x", "chosen": "  ", "rejected": "b"}, r"bad\.jsonl:2: field 'chosen': empty response"),
        (
            {"prompt": "x", "responses": ["a", ""], "ranks": [0, 1]},
            r":2: field 'responses\[1\]': empty response",
        ),
        (
            {"conversation": [{"role": "human", "content": "x"}], "chosen": "a", "rejected": "b"},
            r"bad\.jsonl:2: field 'conversation\[0\]\.role': unknown role 'human'",
        ),
        (
            {"conversation": [{"role": "user"}], "chosen": "a", "rejected": "b"},
            r":2: field 'conversation\[0\]\.content': missing",
        ),
        (
            {"conversation": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
            r":2: field 'conversation': the last turn must be a user turn",
        ),
        ({"prompt": "x", "responses": ["a", "b"], "ranks": [0]}, r":2: field 'ranks': 1 ranks for 2"),
        ({"prompt": "x", "chosen": "a", "rejected": "a"}, r":2: field 'rejected': same text"),
        (
            {"prompt": "x", "chosen": 3, "rejected": "a"},
            r":2: field 'chosen': expected a string, got a number",
        ),
        ([1, 2], r"bad\.jsonl:2: expected a JSON object"),
    ],
)
def test_bad_user_lines(tmp_path: Path, line, pattern: str) -> None:
    good = {"prompt": "ok", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, line])
    with pytest.raises(DataError, match=pattern):
        load_jsonl(path)


def test_skip_bad_counts_and_logs(tmp_path: Path, caplog) -> None:
    good = {"prompt": "ok", "chosen": "a", "rejected": "b"}
    lines = [good, "{not json", {"prompt": "x"}, good, {"prompt": "x", "chosen": "", "rejected": "b"}, ""]
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="dmoerm.data"):
        rs = load_jsonl(path, skip_bad=True)
    assert len(rs) == 2 and rs.report.skipped == 3 and rs.report.loaded == 2
    assert [p.split(":")[1] for p in rs.report.skipped_lines] == ["2", "3", "5"]
    assert "skipped 3 bad record(s)" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# Splits


def _records(n: int) -> list[PreferenceRecord]:
    out = []
    for i in range(n):
        conv = (Message("user", f"prompt {i % (n // 2)}"),)  # every prompt twice
        out.append(PreferenceRecord(conv, ("a", "b"), (0, 1), uid=str(i)))
    return out


def test_split_disjoint_and_deterministic() -> None:
    recs = _records(2000)
    fr = {"train": 0.8, "dev": 0.1, "test": 0.1}
    s1 = split_by_prompt(recs, fr, seed=3)
    s2 = split_by_prompt(list(reversed(recs)), fr, seed=3)
    assert list(s1) == ["train", "dev", "test"]
    assert sum(map(len, s1.values())) == 2000
    keys = {name: {r.prompt_key for r in rs} for name, rs in s1.items()}
    assert (
        not (keys["train"] & keys["dev"])
        and not (keys["train"] & keys["test"])
        and not (keys["dev"] & keys["test"])
    )
    assert {n: {r.uid for r in rs} for n, rs in s1.items()} == {
        n: {r.uid for r in rs} for n, rs in s2.items()
    }
    assert 1400 < len(s1["train"]) < 1800
    s3 = split_by_prompt(recs, fr, seed=4)
    assert {r.uid for r in s3["test"]} != {r.uid for r in s1["test"]}


def test_split_same_prompt_across_record_types() -> None:
    recs = _records(200)
    prompts = [PromptRecord(r.conversation) for r in recs]
    a = split_by_prompt(recs, {"x": 0.5, "y": 0.5})
    b = split_by_prompt(prompts, {"x": 0.5, "y": 0.5})
    assert {r.prompt_key for r in a["x"]} == {r.prompt_key for r in b["x"]}


@pytest.mark.parametrize(
    ("fractions", "pattern"),
    [
        ({"train": 0.8, "test": 0.1}, "sum to 0.9"),
        ({"train": 1.2, "test": -0.2}, r"fractions\['train'\]: 1.2 is outside"),
        ({}, "non-empty"),
        ({"train": "0.5", "test": 0.5}, "not a number"),
        ({"": 1.0}, "non-empty string"),
    ],
)
def test_split_fraction_validation(fractions, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        split_by_prompt(_records(4), fractions)


def test_split_real_records_disjoint(data_dir: Path) -> None:
    recs = load_source("rmb/pairwise_helpfulness", data_dir, limit=1000)
    s = split_by_prompt(recs, {"train": 0.9, "test": 0.1})
    assert not {r.prompt_key for r in s["train"]} & {r.prompt_key for r in s["test"]}


def test_prompt_key_is_the_records_hash_and_conversation_key_the_exact_turns() -> None:
    from dmoerm.data import conversation_key, prompt_key

    conv = (Message("system", "Be brief."), Message("user", "Hi"))
    padded = (Message("system", "Be brief. "), Message("user", "\nHi"))
    rec = PreferenceRecord.from_pair(conv, "a", "b")
    assert prompt_key(conv) == rec.prompt_key == PromptRecord(conv).prompt_key
    # The stored form (splits depend on it): SHA-1 of role\x1fcontent turns joined by \x1e.
    assert prompt_key(conv) == "ca7f689517cd365dc16f6f6fff2d683a7de7655c"
    assert prompt_key(padded) == prompt_key(conv)  # stripped turns: the same split
    assert conversation_key(conv) == (("system", "Be brief."), ("user", "Hi"))
    assert conversation_key(padded) != conversation_key(conv)  # held-out sets compare the turns as they are
