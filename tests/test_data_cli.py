"""Issue 14 item 6 through the commands: a lone surrogate is the usual file:line:field error in `dmoerm train`
and `dmoerm eval`; an empty or blank-only eval file is an error, not agreement NaN."""

from __future__ import annotations

import json

import pytest

from dmoerm.cli import main
from dmoerm.evaluation import load_eval_records
from dmoerm.experts import BackboneConfig
from dmoerm.reward_model import RewardModel
from dmoerm.taxonomy import load_taxonomy

GOOD = json.dumps({"prompt": "Sky colour?", "chosen": "Blue.", "rejected": "Green."})
SURROGATE = '{"prompt": "Q", "chosen": "a\\ud800b", "rejected": "no"}'


@pytest.fixture
def surrogate_file(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text(f"{GOOD}\n{GOOD}\n{SURROGATE}\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def saved_rm(tiny_backbone, tmp_path_factory):
    folder = tmp_path_factory.mktemp("rm") / "rm"
    cfg = BackboneConfig(backbone=tiny_backbone, num_top_layers=2, trunk_dtype="float32", max_length=64)
    RewardModel.create(cfg).save_pretrained(folder)
    return folder


def test_train_names_file_line_field_of_a_lone_surrogate(tmp_path, surrogate_file, caplog):
    config = tmp_path / "c.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\ndata:\n  sources: [{surrogate_file}]\n")
    assert main(["train", "--config", str(config)]) == 2
    assert f"{surrogate_file}:3: field 'chosen': holds a lone surrogate" in caplog.text


def test_eval_names_file_line_field_of_a_lone_surrogate(tmp_path, saved_rm, surrogate_file, caplog):
    assert main(["eval", "--model", str(saved_rm), "--data", str(surrogate_file)]) == 2
    assert f"{surrogate_file}:3: field 'chosen': holds a lone surrogate" in caplog.text


@pytest.mark.parametrize("text", ["", "\n  \n\t\n"], ids=["empty", "blank-only"])
def test_eval_of_an_empty_file_is_an_error(tmp_path, saved_rm, text, caplog):
    path = tmp_path / "empty.jsonl"
    path.write_text(text)
    out = tmp_path / "ev"
    assert main(["eval", "--model", str(saved_rm), "--data", str(path), "--out", str(out)]) == 2
    assert f"data: {path}: no records to evaluate; is it empty or blank?" in caplog.text
    assert not (out / "eval.json").exists()


def test_eval_records_of_a_file_whose_every_line_was_skipped(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "Q"}\n{not json\n')
    with pytest.raises(ValueError, match=r"no records to evaluate \(2 bad line\(s\) skipped\)"):
        load_eval_records([str(path)], load_taxonomy("default"), skip_bad=True)
    good = tmp_path / "good.jsonl"
    good.write_text(GOOD + "\n")
    assert len(load_eval_records([str(good)], load_taxonomy("default"))) == 1
