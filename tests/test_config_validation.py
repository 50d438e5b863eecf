"""The whole pipeline config is typed and checked before any work; errors name the field path and value."""

from __future__ import annotations

import pytest

from dmoerm.cli import main
from dmoerm.config_check import ConfigError, build, check_instance
from dmoerm.pipeline import PipelineConfig


@pytest.fixture
def job(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(f"output_dir: {tmp_path / 'run'}\ndata:\n  test_records: 5\n")
    return path


def test_numbers_written_as_1e_3_are_floats(job):
    config = PipelineConfig.from_file(job, ["phase1.learning_rate=1e-3", "phase3.learning_rate=2"])
    assert config.phase1.learning_rate == 1e-3 and isinstance(config.phase1.learning_rate, float)
    assert config.phase3.learning_rate == 2.0 and isinstance(config.phase3.learning_rate, float)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            'phase1.epochs="3"',
            r"phase1\.epochs: '3' is not allowed; expected an integer; write it without quotes",
        ),
        ("phase1.batch_size=2.5", r"phase1\.batch_size: 2\.5 is not allowed; expected an integer"),
        ("phase1=3", r"phase1: 3 is not allowed; expected a section \(mapping\) with fields learning_rate"),
        ("baseline=yes_please", r"baseline: 'yes_please' is not allowed; expected a boolean"),
        ("labels.min_labels=-1", r"labels\.min_labels: must be >= 1, got -1"),
        ("ensemble_size=2.5", r"ensemble_size: 2\.5 is not allowed; expected an integer"),
        ("phase1.length_covariate=-1", r"phase1\.length_covariate: must be a finite number >= 0, got -1\.0"),
        ("phase3.length_covariate=yes", r"phase3\.length_covariate: True is not allowed; expected a number"),
        (
            "data.sources=/path/file.jsonl",
            r"data\.sources: '/path/file\.jsonl' is not allowed; expected a list of "
            r"strings; write a list, e\.g\. \[/path/file\.jsonl\]",
        ),
        ("data.sources=[1]", r"data\.sources\[0\]: 1 is not allowed; expected a string"),
        ("phase1.learning_rate=fast", r"phase1\.learning_rate: 'fast' is not allowed; expected a number"),
        (
            "data.categories=code",
            r"data\.categories: 'code' is not allowed; expected a list of strings; write a list",
        ),
        ("labels.judge.bogus=1", r"labels\.judge: unknown field\(s\) bogus"),
        ("labels.judge.batch_size=x", r"labels\.judge\.batch_size: 'x' is not allowed; expected an integer"),
        ("labels.judge.dtype=int8", r"labels\.judge\.dtype: 'int8' is not one of float32"),
        ("labels.max_failed_share=2", r"labels\.max_failed_share: must be in \[0, 1\], got 2"),
        ("model.lora_rank=0", r"model\.lora_rank: must be >= 1, got 0"),
        (
            "model.lora_target_modules=[q_proj, 3]",
            r"model\.lora_target_modules: .* expected a list of strings or a",
        ),
        (
            "router.seed=null",
            r"router\.seed: None is not allowed; expected an integer; null is not allowed here",
        ),
    ],
)
def test_bad_values_name_the_field_the_value_and_what_is_allowed(job, override, message):
    with pytest.raises(ValueError, match=message):
        PipelineConfig.from_file(job, [override])


def test_openai_judge_needs_a_model_and_an_inline_key_is_refused_without_echoing_it(job):
    with pytest.raises(ValueError, match=r"labels\.judge\.model: the openai backend needs"):
        PipelineConfig.from_file(job, ["labels.source=openai"])
    with pytest.raises(ValueError, match=r"labels\.judge\.api_key: not an option.*api_key_env") as e:
        PipelineConfig.from_file(
            job, ["labels.source=openai", "labels.judge.model=m", "labels.judge.api_key=sk-123"]
        )
    assert "sk-123" not in str(e.value)


def test_yaml_and_json_syntax_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  test_records: 5\n phase1: [1, 2\n")
    with pytest.raises(ValueError, match=r"bad\.yaml:3: not valid YAML"):
        PipelineConfig.from_file(bad)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"data": {"test_records": 5,}\n}')
    with pytest.raises(ValueError, match=r"bad\.json:1: not valid JSON"):
        PipelineConfig.from_file(bad_json)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match=r"list\.yaml: expected a mapping of sections"):
        PipelineConfig.from_file(listed)


def test_train_prints_the_error_and_exits_2_before_any_work(job, tmp_path, capsys, caplog):
    rc = main(["train", "--config", str(job), "--set", "labels.judge.bogus=1"])
    assert rc == 2
    assert "labels.judge: unknown field(s) bogus" in caplog.text
    assert not (tmp_path / "run").exists()  # nothing written, not even config.yaml
    key = [
        "--set",
        "labels.source=openai",
        "--set",
        "labels.judge.model=m",
        "--set",
        "labels.judge.api_key=sk-9",
    ]
    assert main(["train", "--config", str(job), *key]) == 2
    assert "labels.judge.api_key: not an option" in caplog.text and "sk-9" not in caplog.text
    assert not (tmp_path / "run").exists()


def test_a_built_config_is_type_checked_again_and_ints_become_floats():
    config = PipelineConfig()
    config.phase1.epochs = "3"
    with pytest.raises(ConfigError, match=r"phase1\.epochs: '3' is not allowed"):
        check_instance(config)
    config = PipelineConfig()
    config.trunk_cache_gb = 2
    check_instance(config)
    assert config.trunk_cache_gb == 2.0 and isinstance(config.trunk_cache_gb, float)


def test_build_works_for_other_config_dataclasses():
    from dmoerm.evaluation.overopt import OverOptConfig

    with pytest.raises(ConfigError, match=r"overopt: unknown field\(s\) nope"):
        build(OverOptConfig, {"nope": 1}, root="overopt")
