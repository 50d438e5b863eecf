# ruff: noqa: F811  (tests take the imported `server` fixture as an argument)
"""The typed judge configurations (API and local apart), the flat command options that select one, and the
Labeller entry that labels given records with a judge configuration (what the training pipeline calls)."""

from __future__ import annotations

import dataclasses

import pytest

from dmoerm.config_check import ConfigError, build
from dmoerm.labelling.api import OpenAIJudge
from dmoerm.labelling.config import ApiJudgeConfig, JudgeConfig, LocalJudgeConfig, make_judge
from dmoerm.labelling.local import LocalJudge
from dmoerm.labelling.pipeline import LabelConfig, LabelJudgeConfig, Labeller, label_pairs, label_records
from test_labelling_api import (
    KEY_ENV,
    TAX,
    _pairs,
    server,  # noqa: F401  (the fake judge fixture)
)

API_ONLY = {"base_url", "api_key_env", "mode", "concurrency", "requests_per_second", "timeout_s", "max_retries",
            "backoff_base_s", "backoff_max_s", "malformed_retries", "temperature", "logprobs",
            "price_prompt_per_m", "price_completion_per_m"}  # fmt: skip
LOCAL_ONLY = {"device", "dtype", "batch_size", "reuse_prefix", "max_length"}


def _names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_api_and_local_configs_hold_only_their_own_options():
    assert _names(ApiJudgeConfig) == {"model", "cache", "answer_labels"} | API_ONLY
    assert _names(LocalJudgeConfig) == {"model", "cache", "answer_labels"} | LOCAL_ONLY
    # the flat command options: every option of both, one name each, plus what the commands add
    assert _names(JudgeConfig) == _names(ApiJudgeConfig) | _names(LocalJudgeConfig) | {
        "backend", "min_margin", "language", "progress"
    }  # fmt: skip
    with pytest.raises(TypeError, match="dtype"):
        ApiJudgeConfig(model="m", dtype="float32")
    with pytest.raises(TypeError, match="base_url"):
        LocalJudgeConfig(base_url="http://x")


@pytest.mark.parametrize(
    ("cls", "kw", "message"),
    [
        (ApiJudgeConfig, {}, r"^model: the openai backend needs the served model name"),
        (ApiJudgeConfig, {"model": "m", "mode": "xml"}, r"^mode: 'xml' is not one of pairwise, json$"),
        (ApiJudgeConfig, {"model": "m", "concurrency": 0}, r"^concurrency: 0 must be >= 1$"),
        (ApiJudgeConfig, {"model": "m", "timeout_s": 0}, r"^timeout_s: 0 must be > 0$"),
        (ApiJudgeConfig, {"model": "m", "base_url": "x.org"}, r"^base_url: 'x.org' must start with http://"),
        (
            ApiJudgeConfig,
            {"model": "m", "answer_labels": "XY"},
            r"^answer_labels: 'XY' is not one of 12, AB$",
        ),
        (LocalJudgeConfig, {"dtype": "int8"}, r"^dtype: 'int8' is not one of float32, bfloat16, float16$"),
        (LocalJudgeConfig, {"device": "tpu"}, r"^device: 'tpu' is not one of cpu, cuda, cuda:N, mps, auto$"),
        (LocalJudgeConfig, {"batch_size": 0}, r"^batch_size: 0 must be >= 1$"),
        (LocalJudgeConfig, {"cache": " "}, r"^cache: empty"),
    ],
)
def test_typed_config_errors_name_field_value_and_what_is_allowed(cls, kw, message):
    with pytest.raises(ValueError, match=message):
        cls(**kw)


def test_flat_options_give_the_typed_config_of_their_backend(tmp_path):
    out = str(tmp_path / "l.jsonl")
    api = LabelConfig(data=["x"], out=out, backend="openai", model="m", concurrency=3, dtype="float16")
    assert api.judge_config() == ApiJudgeConfig(model="m", concurrency=3, cache=out + ".cache.sqlite")
    local = LabelConfig(data=["x"], out=out, batch_size=2, concurrency=3)
    assert local.judge_config() == LocalJudgeConfig(batch_size=2, cache=out + ".cache.sqlite")
    with pytest.raises(ValueError, match="^dtype: 'int8'"):  # the unselected judge's options are checked too
        LabelConfig(data=["x"], out=out, backend="openai", model="m", dtype="int8")


def test_make_judge_picks_the_judge_by_the_config_type(tmp_path, tiny_backbone):
    api = make_judge(ApiJudgeConfig(model="m", base_url="http://127.0.0.1:9/v1", concurrency=5,
                                    answer_labels="AB", cache=str(tmp_path / "a.sqlite")))  # fmt: skip
    assert isinstance(api, OpenAIJudge) and api.concurrency == 5 and api.prompts.labels == ("A", "B")
    assert api.cache.path == tmp_path / "a.sqlite"
    local = make_judge(LocalJudgeConfig(model=tiny_backbone, dtype="float32", batch_size=3))
    assert isinstance(local, LocalJudge) and local.batch_size == 3 and local.cache.path is None  # in memory
    assert local._model is None  # nothing loaded until first use
    assert isinstance(make_judge(JudgeConfig(backend="openai", model="m", cache=":memory:")), OpenAIJudge)
    with pytest.raises(TypeError, match="cfg: expected an ApiJudgeConfig, LocalJudgeConfig or JudgeConfig"):
        make_judge({"backend": "openai"})


def test_the_pipeline_labels_section_builds_without_data_or_output():
    cfg = build(
        LabelJudgeConfig, {"consistency": "strict", "batch_size": 4, "cache": "c.sqlite"}, "labels.judge"
    )
    assert cfg.consistency == "strict" and cfg.judge_config() == LocalJudgeConfig(
        batch_size=4, cache="c.sqlite"
    )
    with pytest.raises(ValueError, match="^cache: no judge cache path configured"):
        LabelJudgeConfig().judge_config()
    with pytest.raises(ConfigError, match=r"^labels\.judge\.dtype: 'int8' is not one of float32"):
        build(LabelJudgeConfig, {"dtype": "int8"}, "labels.judge")
    with pytest.raises(ConfigError, match=r"^labels\.judge: unknown field\(s\) data"):
        build(LabelJudgeConfig, {"data": ["pipeline"]}, "labels.judge")
    with pytest.raises(ValueError, match="^consistency: margin needs logit margins"):
        LabelJudgeConfig(backend="openai", model="m", consistency="margin")
    with pytest.raises(TypeError, match="config: expected a LabelJudgeConfig"):
        Labeller(ApiJudgeConfig(model="m"), TAX)


def test_labeller_keeps_one_judge_across_files_and_equals_label_pairs(server, tmp_path):
    cfg = LabelJudgeConfig(backend="openai", model="rule-judge", base_url=server.url, api_key_env=KEY_ENV,
                           cache=str(tmp_path / "judge.sqlite"), consistency="strict", progress=False)  # fmt: skip
    labeller = Labeller(cfg, TAX)
    first = labeller.label(_pairs(3), tmp_path / "chat.jsonl", max_pairs_per_record=1)
    judge = labeller.judge
    second = labeller.label(_pairs(5)[3:], tmp_path / "more.jsonl")
    assert labeller.judge is judge and first.kept == 6 and second.kept == 4 and server.answers == 20
    # the same labels as label_pairs with a judge built by hand (served from the cache: nothing asked)
    ref = label_pairs(_pairs(3), TAX, make_judge(cfg), tmp_path / "ref.jsonl", consistency="strict",
                      progress=False)  # fmt: skip
    assert ref.asked == 0 and sorted((tmp_path / "ref.jsonl").read_text().splitlines()) == sorted(
        (tmp_path / "chat.jsonl").read_text().splitlines()
    )
    again = label_records(cfg, _pairs(3), TAX, tmp_path / "chat.jsonl")
    assert again.pairs_done_before == 3 and again.written == 0
