"""Users' data as they have it (issue 15 item 4): TRL's preference formats in JSONL, JSON, Parquet and
``datasets`` folders through the one loader, with the same file:line:field errors; and odd text (issue 14
item 6): lone surrogates, bytes that are not UTF-8."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dmoerm.data import DataError, Message, PreferenceRecord, PromptRecord, load_data, load_file, load_jsonl

datasets = pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
trl_data_utils = pytest.importorskip("trl.data_utils")

Q = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky colour?"}]
A_GOOD = {"role": "assistant", "content": "Blue."}
A_BAD = {"role": "assistant", "content": "Green."}

STANDARD = {"prompt": "Sky colour?", "chosen": "Blue.", "rejected": "Green."}
CONVERSATIONAL = {"prompt": Q, "chosen": [A_GOOD], "rejected": [A_BAD]}
IMPLICIT = {"chosen": Q + [A_GOOD], "rejected": Q + [A_BAD]}
MULTI_TURN_IMPLICIT = {
    "chosen": Q
    + [A_GOOD, {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Rayleigh."}],
    "rejected": Q + [A_GOOD, {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Magic."}],
}
HH = {
    "chosen": "\n\nHuman: Sky colour?\n\nAssistant: Blue.",
    "rejected": "\n\nHuman: Sky colour?\n\nAssistant: Green.",
}

SYSTEM_Q = (Message("system", "Be brief."), Message("user", "Sky colour?"))
USER_Q = (Message("user", "Sky colour?"),)


def columns(rows: list[dict]) -> dict[str, list]:
    """Every row's keys as columns, null where a row lacks one (as Arrow containers hold such rows)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return {k: [r.get(k) for r in rows] for k in keys}


def dataset(rows: list[dict]):
    return datasets.Dataset.from_dict(columns(rows))


def write(path: Path, fmt: str, rows: list[dict]) -> str:
    """``rows`` written as ``fmt``; returns what to hand ``load_data``."""
    if fmt == "jsonl":
        path = path.with_suffix(".jsonl")
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "json":
        path = path.with_suffix(".json")
        path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    elif fmt == "json-data":
        path = path.with_suffix(".json")
        path.write_text(json.dumps({"version": 1, "data": rows}, indent=1), encoding="utf-8")
    elif fmt == "parquet":
        path = path.with_suffix(".parquet")
        pq.write_table(pa.Table.from_pydict(columns(rows)), path)
    elif fmt == "datasets":
        dataset(rows).save_to_disk(str(path))
    elif fmt == "datasetdict":
        d = datasets.DatasetDict({"train": dataset(rows), "test": dataset(rows[:1])})
        d.save_to_disk(str(path))
    return str(path)


FORMATS = ["jsonl", "json", "json-data", "parquet", "datasets", "datasetdict"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("rows", "conversation"),
    [
        ([STANDARD, dict(STANDARD, tie=True)], USER_Q),
        ([CONVERSATIONAL, CONVERSATIONAL], SYSTEM_Q),
        ([IMPLICIT, IMPLICIT], SYSTEM_Q),
        ([HH, HH], USER_Q),
    ],
    ids=["standard", "conversational", "implicit-prompt", "hh-implicit"],
)
def test_every_trl_format_from_every_container(tmp_path, fmt, rows, conversation):
    recs = load_data(write(tmp_path / "prefs", fmt, rows))
    assert [type(r) for r in recs] == [PreferenceRecord, PreferenceRecord]
    assert recs[0].conversation == conversation
    assert recs[0].responses == ("Blue.", "Green.") and recs[0].ranks == (0, 1)
    if rows[1].get("tie"):
        assert recs[1].ranks == (0, 0)  # the Arrow containers' null `tie` of row 0 read as absent
    assert recs.report.loaded == 2 and recs[0].source == "prefs"


def test_implicit_prompt_is_what_trl_extracts(tmp_path):
    """The prompt of an implicit-prompt row is the turns TRL's own extract_prompt takes as the prompt."""
    for row in (IMPLICIT, MULTI_TURN_IMPLICIT):
        (rec,) = load_data(write(tmp_path / "imp", "jsonl", [row]))
        trl = trl_data_utils.extract_prompt(row)
        assert [m.to_json() for m in rec.conversation] == trl["prompt"]
        assert [rec.chosen] == [m["content"] for m in trl["chosen"]]
        assert [rec.rejected] == [m["content"] for m in trl["rejected"]]
    assert len(rec.conversation) == 4 and rec.responses == ("Rayleigh.", "Magic.")


def test_ultrafeedback_style_prompt_beside_whole_conversations(tmp_path):
    """HuggingFaceH4/ultrafeedback_binarized: a string `prompt` and chosen/rejected that repeat it."""
    row = {"prompt": "Sky colour?", "chosen": [Q[1], A_GOOD], "rejected": [Q[1], A_BAD], "score_chosen": 9.0}
    (rec,) = load_data(write(tmp_path / "uf", "parquet", [row]))
    assert rec.conversation == USER_Q and rec.responses == ("Blue.", "Green.")
    assert rec.meta == {"score_chosen": 9.0}


def test_conversational_prompt_only_rows_and_responses_lists(tmp_path):
    path = write(tmp_path / "p", "jsonl", [{"prompt": Q}, {"prompt": "Hi?"}])
    assert [r.conversation for r in load_file(path, kind="prompt")] == [SYSTEM_Q, (Message("user", "Hi?"),)]
    assert all(isinstance(r, PromptRecord) for r in load_file(path, kind="prompt"))
    row = {"prompt": Q, "responses": [[A_GOOD], "Grey.", [A_BAD]], "ranks": [0, 1, 2]}
    (rec,) = load_data(write(tmp_path / "r", "jsonl", [row]))
    assert rec.responses == ("Blue.", "Grey.", "Green.")


def test_datasetdict_split_syntax_and_errors(tmp_path):
    folder = write(tmp_path / "dd", "datasetdict", [STANDARD, CONVERSATIONAL | {"prompt": Q}][:1] * 3)
    assert len(load_data(folder)) == 3  # default split: train
    test = load_data(f"{folder}:test")
    assert len(test) == 1 and test.report.source == f"{folder}:test"
    with pytest.raises(DataError, match=r"dd:validation: no split 'validation'; its splits: train, test"):
        load_data(f"{folder}:validation")
    single = write(tmp_path / "single", "datasets", [STANDARD])
    with pytest.raises(DataError, match="holds one Dataset without splits"):
        load_data(f"{single}:train")
    jsonl = write(tmp_path / "f", "jsonl", [STANDARD])
    with pytest.raises(DataError, match="chooses a split of a datasets folder"):
        load_data(f"{jsonl}:train")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not one datasets' save_to_disk wrote"):
        load_data(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="datasets folder"):
        load_data(tmp_path / "nothing_here")


@pytest.mark.parametrize(
    ("fmt", "where"),
    [
        ("jsonl", r"bad\.jsonl:3"),
        ("json", r"bad\.json:12"),
        ("parquet", r"bad\.parquet:row 2"),
        ("datasets", r"bad:row 2"),
    ],
)
def test_bad_row_named_by_line_or_row_in_every_container(tmp_path, fmt, where):
    bad = {"prompt": "Q", "chosen": "Same.", "rejected": "Same."}
    path = write(tmp_path / "bad", fmt, [STANDARD, STANDARD, bad, STANDARD])
    with pytest.raises(DataError, match=where + r": field 'rejected': same text as 'chosen'"):
        load_data(path)
    recs = load_file(path, skip_bad=True)
    assert len(recs) == 3 and recs.report.skipped == 1


@pytest.mark.parametrize(
    ("row", "pattern"),
    [
        (
            {"prompt": Q, "chosen": [A_GOOD, A_GOOD], "rejected": [A_BAD]},
            r"field 'chosen': expected one assistant turn, got 2",
        ),
        (
            {"prompt": Q, "chosen": [Q[1]], "rejected": [A_BAD]},
            r"field 'chosen': expected one assistant turn, got 1 \(user\)",
        ),
        (
            {"prompt": Q, "chosen": [A_GOOD], "rejected": "Green."},
            r"field 'rejected': expected a list of turns like 'chosen'",
        ),
        (
            {"chosen": [A_GOOD], "rejected": [A_BAD]},
            r"field 'prompt': missing, and 'chosen' and 'rejected' share no turn",
        ),
        (
            {"prompt": "Other?", "chosen": Q + [A_GOOD], "rejected": Q + [A_BAD]},
            r"field 'prompt': differs from the turns",
        ),
        (
            {"chosen": Q + [A_GOOD], "rejected": Q + [A_GOOD]},
            r"field 'rejected': the same turns as 'chosen'",
        ),
        (
            {"chosen": Q + [A_GOOD], "rejected": Q + [A_GOOD, A_BAD]},
            r"field 'chosen': no response after the turns it shares with 'rejected'",
        ),
        (
            {"chosen": Q + [A_GOOD, A_GOOD], "rejected": Q + [A_GOOD, A_BAD]},
            r"field 'chosen': the turns shared .* end with 'assistant'",
        ),
        (
            {"prompt": Q, "chosen": [{"role": "assistant", "content": " "}], "rejected": [A_BAD]},
            r"field 'chosen\[0\]\.content': empty response",
        ),
        (
            {"prompt": Q, "chosen": [{"role": "bot", "content": "x"}], "rejected": [A_BAD]},
            r"field 'chosen\[0\]\.role': unknown role 'bot'",
        ),
        ({"chosen": "Blue.", "rejected": "Green."}, r"field 'conversation': missing .* Anthropic HH"),
    ],
)
def test_bad_trl_rows_name_the_field(tmp_path, row, pattern):
    with pytest.raises(DataError, match=r"t\.jsonl:2: " + pattern):
        load_data(write(tmp_path / "t", "jsonl", [STANDARD, row]))


def test_json_documents_and_json_lines_named_json(tmp_path):
    as_lines = tmp_path / "lines.json"  # JSON lines under a .json name are still read
    as_lines.write_text(json.dumps(STANDARD) + "\n" + json.dumps(STANDARD) + "\n")
    assert len(load_data(as_lines)) == 2
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"prompt": "Q",\n   "chosen": "a" "rejected": "b"}\n]\n')
    with pytest.raises(DataError, match=r"broken\.json:3: malformed JSON \(Expecting ',' delimiter"):
        load_data(broken)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert len(load_data(empty)) == 0
    not_objects = tmp_path / "nums.json"
    not_objects.write_text("[\n1,\n2\n]")
    with pytest.raises(DataError, match=r"nums\.json:2: expected a JSON object, got a number"):
        load_data(not_objects)
    assert load_data(write(tmp_path / "lim", "parquet", [STANDARD] * 5), limit=2).report.loaded == 2


# ---------------------------------------------------------------------------------------------------------------
# Issue 14 item 6: odd text


def test_lone_surrogate_is_a_file_line_field_error(tmp_path):
    good = json.dumps(STANDARD)
    path = tmp_path / "s.jsonl"
    path.write_text(
        good + "\n" + '{"prompt": "Q", "chosen": "a\\ud800b", "rejected": "no"}\n', encoding="utf-8"
    )
    with pytest.raises(DataError, match=r"s\.jsonl:2: field 'chosen': holds a lone surrogate"):
        load_data(path)
    nested = tmp_path / "n.json"
    conv = '[{"role": "user", "content": "hi"}, {"role": "user", "content": "x\\udc00"}]'
    nested.write_text(f'[\n{good},\n{{"conversation": {conv}, "chosen": "a", "rejected": "b"}}\n]')
    with pytest.raises(
        DataError, match=r"n\.json:3: field 'conversation\[1\]\.content': holds a lone surrogate"
    ):
        load_data(nested)
    assert len(load_data(nested, skip_bad=True)) == 1
    pair = tmp_path / "pair.jsonl"  # a whole surrogate pair is an ordinary character (an emoji)
    pair.write_text('{"prompt": "Q \\ud83d\\ude00", "chosen": "a", "rejected": "b"}\n')
    assert load_data(pair)[0].conversation[0].content == "Q \U0001f600"


@pytest.mark.parametrize("name", ["b.jsonl", "b.jsonl.gz", "b.json"])
def test_non_utf8_byte_names_its_own_line(tmp_path, name):
    import gzip

    lines = [json.dumps(STANDARD).encode()] * 3 + [b'{"prompt": "Q", "chosen": "caf\xe9", "rejected": "b"}']
    data = b"\n".join(lines) + b"\n"
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    with pytest.raises(DataError, match=r"b\.json(l|l\.gz)?:4: not UTF-8 text \(byte 0xe9"):
        load_data(path)


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(STANDARD).encode() + b"\n")
    assert len(load_jsonl(path)) == 1


def test_truncated_parquet_is_named(tmp_path):
    path = write(tmp_path / "cut", "parquet", [STANDARD] * 3)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.parquet:row 0: cannot read the Parquet file"):
        load_data(path)
