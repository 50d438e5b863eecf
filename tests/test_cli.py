"""The command line: options come from the config dataclasses; eval runs on a saved single RM and DMoERM."""

from __future__ import annotations

import json

import pytest

from dmoerm.cli import build_parser, main
from dmoerm.data import save_jsonl
from dmoerm.experts import BackboneConfig
from dmoerm.model import new_dmoerm, rm_expert
from dmoerm.reward_model import RewardModel
from helpers import length_records, tiny_taxonomy

TAXONOMY = tiny_taxonomy()


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "prefs.jsonl"
    records = length_records(6, seed=3, category="code") + length_records(4, seed=4)  # 4 without a category
    save_jsonl(records, path)
    return path


def config(tiny_backbone) -> BackboneConfig:
    return BackboneConfig(backbone=tiny_backbone, num_top_layers=2, trunk_dtype="float32", max_length=64)


def test_eval_of_a_saved_single_reward_model(tmp_path, tiny_backbone, data_file, capsys):
    RewardModel.create(config(tiny_backbone)).save_pretrained(tmp_path / "rm")
    rc = main(
        ["eval", "--model", str(tmp_path / "rm"), "--data", str(data_file), "--out", str(tmp_path / "ev")]
    )
    assert rc == 0
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert result["overall"]["agreement"]["n"] == 10
    assert result["system"] == "rm"
    assert "agreement" in capsys.readouterr().out.lower()
    # Issue 8: the reward's correlation with response length in the scorer's own tokens, beside characters.
    length = result["overall"]["length"]
    assert -1.0 <= length["pearson_tokens"] <= 1.0 and -1.0 <= length["spearman_tokens"] <= 1.0
    assert "Pearson (tokens)" in (tmp_path / "ev" / "eval.md").read_text()


def test_eval_of_a_saved_dmoerm_uses_the_router_for_records_without_category(
    tmp_path, tiny_backbone, data_file
):
    model = new_dmoerm(config(tiny_backbone), TAXONOMY, ["code", "chat"])
    for c in model.categories:  # the inner models as phase 1 leaves them
        model.bank.add_expert(rm_expert(c))
    model.save_pretrained(tmp_path / "dm")
    assert (
        main(
            ["eval", "--model", str(tmp_path / "dm"), "--data", str(data_file), "--out", str(tmp_path / "ev")]
        )
        == 0
    )
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert result["category_source"] == "record, else scorer"
    per_cat = {row["category"]: row["n_records"] for row in result["per_category"]}
    assert per_cat.get("code", 0) >= 6 and sum(per_cat.values()) == 10


def test_options_are_the_config_fields_with_their_docs():
    parser = build_parser()
    args = parser.parse_args(["eval", "--model", "m", "--data", "a", "b", "--limit", "5", "--no-skip-bad"])
    assert args.data == ["a", "b"] and args.limit == 5 and args.skip_bad is False
    assert not hasattr(args, "batch_size")  # not given: the dataclass default applies
    help_text = parser._subparsers._group_actions[0].choices["eval"].format_help()
    assert "Bootstrap resamples" in help_text


def test_bad_input_is_one_clear_line_and_exit_code_2(tmp_path, caplog):
    bad = tmp_path / "c.yaml"
    bad.write_text("data:\n  phase_one: 1\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "unknown field(s) phase_one" in caplog.text
    assert main(["eval", "--model", str(tmp_path), "--data", "no_such_source"]) == 2
