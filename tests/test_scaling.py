"""The scaling study on a tiny backbone: nested sizes, one fixed test set, seeds, OOD sets, ablations, report."""

from __future__ import annotations

import json

import pytest
import yaml

from dmoerm.data import load_data, save_jsonl
from dmoerm.pipeline.scaling import ScalingConfig, run_scaling
from helpers import job_config_dict, length_records


@pytest.mark.slow
def test_scaling_study_runs_nested_sizes_on_one_test_set(tmp_path, tiny_backbone, caplog):
    base = job_config_dict(tmp_path, tiny_backbone, baseline=True, labels={"source": "none"})
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    ood = tmp_path / "ood.jsonl"
    save_jsonl(length_records(6, seed=9), ood)
    config = ScalingConfig(
        base_config=str(tmp_path / "base.yaml"),
        output_dir=str(tmp_path / "study"),
        sizes=[4, 8],
        seeds=[0, 1],
        seeds_up_to=4,
        test_records=5,
        dev_records=3,
        ablations={"cold start": ["warm_start=none"]},
        ood_sources=[str(ood)],
    )
    assert [name for name, _ in config.runs()] == [
        "n4_seed0",
        "n4_seed1",
        "n8_seed0",
        "ablation_cold_start_n8",
    ]
    with caplog.at_level("INFO", logger="dmoerm.pipeline.scaling"):
        summary = run_scaling(config, progress=False)
    study = tmp_path / "study"
    sizes = {name: json.loads((study / name / "sizes.json").read_text()) for name in ("n4_seed0", "n8_seed0")}
    assert sizes["n4_seed0"]["code"]["phase1"] == 4 and sizes["n8_seed0"]["code"]["phase1"] == 8
    # Nested subsets of one split, and the very same test records at every size.
    small = load_data(str(study / "n4_seed0" / "splits" / "phase1.jsonl"))
    large = load_data(str(study / "n8_seed0" / "splits" / "phase1.jsonl"))
    assert {r.prompt_key for r in small} <= {r.prompt_key for r in large}
    tests = [(study / n / "splits" / "test.jsonl").read_text() for n in ("n4_seed0", "n4_seed1", "n8_seed0")]
    assert tests[0] == tests[1] == tests[2]
    entry = summary["runs"]["n8_seed0"]
    assert set(entry["test"]) >= {"DMoERM", "single RM"}
    assert set(entry["ood"][str(ood)]) == {
        "DMoERM",
        "single RM",
    }  # keyed by the source, as the report reads it
    assert "ablation_cold_start_n8" in summary["runs"]
    # The ablation's single RM is the size's own (same inputs), copied, not retrained: identical weights.
    a, b = (study / n / "baseline" / "heads.safetensors" for n in ("n8_seed0", "ablation_cold_start_n8"))
    assert a.read_bytes() == b.read_bytes()
    assert "ablation_cold_start_n8 reuses the single RM of n8_seed0" in caplog.text
    report = (study / "scaling.md").read_text()
    assert "| 4 |" in report and "| 8 |" in report and "cold_start" in report
    ood_table = report.split(f"## Out of distribution: {ood}")[1].split("##")[0]
    assert "| 8 | - |" not in ood_table and "| 8 | " in ood_table  # the OOD agreements are in the table
    assert (study / "scaling_test.png").stat().st_size > 1000
    # Two more ablations, run alone (`dmoerm scaling --only`): no other run is touched, each reuses the single
    # RM of its size's run with the same inputs (the second seed's for an ablation on seed 1), and the summary
    # covers every finished run.
    config.ablations["paper aggregator"] = ["phase3.aggregator=mlp"]
    config.ablations["cold start seed 1"] = ["warm_start=none"] + [
        f"{s}.seed=1" for s in ("router", "phase1", "phase2", "phase3")
    ]
    config.ablation_sizes_of["cold start seed 1"] = [4]
    new = ["ablation_paper_aggregator_n8", "ablation_cold_start_seed_1_n4"]
    touched = {n: (study / n / "state.json").stat().st_mtime_ns for n in ("n4_seed0", "n8_seed0")}
    with pytest.raises(
        ValueError, match="--only: no run named ablation_bogus_n8 in this study; its runs: n4"
    ):
        run_scaling(config, progress=False, only=["ablation_bogus_n8"])
    summary = run_scaling(config, progress=False, only=new)
    assert {n: (study / n / "state.json").stat().st_mtime_ns for n in touched} == touched
    assert {*new, "n4_seed1", "ablation_cold_start_n8"} <= set(summary["runs"])
    heads = lambda n: (study / n / "baseline" / "heads.safetensors").read_bytes()  # noqa: E731
    assert heads("ablation_paper_aggregator_n8") == heads("n8_seed0")
    assert heads("ablation_cold_start_seed_1_n4") == heads("n4_seed1") != heads("n4_seed0")


def test_scaling_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="sizes: need positive integers"):
        ScalingConfig(sizes=[0])
    bad = tmp_path / "s.yaml"
    bad.write_text("sizes: [24]\nbogus: 1\n")
    with pytest.raises(ValueError, match="unknown field\\(s\\) bogus"):
        ScalingConfig.from_file(bad)
