"""Issue 5's over-optimisation experiment: label noise, cached sampling, and the whole run on a tiny backbone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from dmoerm.data import Message, with_label_noise
from dmoerm.evaluation import bon_kl
from dmoerm.evaluation.overopt import OverOptConfig, run_overopt
from dmoerm.pipeline import DataConfig, build_splits
from dmoerm.sampling import generate_samples
from helpers import job_config_dict, length_records

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_label_noise_reverses_about_the_share_and_keeps_each_records_fate():
    records = length_records(400, seed=3)
    noisy = with_label_noise(records, 0.25, seed=0)
    flipped = [a.ranks != b.ranks for a, b in zip(records, noisy)]
    assert 0.19 < sum(flipped) / len(records) < 0.31
    for a, b, f in zip(records, noisy, flipped):
        assert b.responses == a.responses and b.conversation == a.conversation
        assert b.ranks == (tuple(reversed(a.ranks)) if f else a.ranks)  # pairs: (0, 1) <-> (1, 0)
    # A record's fate depends on itself and the seed only, not on the other records.
    assert [r.ranks for r in with_label_noise(records[100:], 0.25, seed=0)] == [r.ranks for r in noisy[100:]]
    assert with_label_noise(records, 0.0) == records
    with pytest.raises(ValueError, match=r"label_noise: 0.5 must be in \[0, 0.5\)"):
        with_label_noise(records, 0.5)


def test_noisy_splits_flip_training_rankings_only():
    records = length_records(300, seed=4, category="code")
    clean = build_splits(records, ["code"], DataConfig(phase1_records=60, phase3_records=60, test_records=20))
    noisy = build_splits(
        records, ["code"], DataConfig(phase1_records=60, phase3_records=60, test_records=20, label_noise=0.3)
    )
    assert noisy.dev == clean.dev and noisy.test == clean.test
    for phase in ("phase1", "phase3"):
        a, b = getattr(clean, phase)["code"], getattr(noisy, phase)["code"]
        assert [r.responses for r in a] == [r.responses for r in b]
        assert 0 < sum(x.ranks != y.ranks for x, y in zip(a, b)) < len(a)
    with pytest.raises(ValueError, match="label_noise: 0.7 must be in"):
        DataConfig(label_noise=0.7)


def test_samples_are_cached_and_a_rerun_generates_nothing(tmp_path, tiny_backbone, monkeypatch):
    convs = [[Message("user", "hello there")], [Message("user", "what is water")]]
    cache = tmp_path / "samples.sqlite"
    first = generate_samples(convs, 3, cache, generator=tiny_backbone, max_new_tokens=6, progress=False)
    assert [len(row) for row in first] == [3, 3]
    assert all(isinstance(s, str) for row in first for s in row)

    def no_model(path):
        raise AssertionError("the generator was loaded although every sample is cached")

    monkeypatch.setattr("dmoerm.sampling._load_generator", no_model)
    assert (
        generate_samples(convs, 3, cache, generator=tiny_backbone, max_new_tokens=6, progress=False) == first
    )
    # Fewer samples are a prefix of the cached ones; other sampling settings are not served from the cache.
    assert generate_samples(convs, 2, cache, generator=tiny_backbone, max_new_tokens=6, progress=False) == [
        row[:2] for row in first
    ]
    with pytest.raises(AssertionError, match="generator was loaded"):
        generate_samples(convs, 3, cache, generator=tiny_backbone, max_new_tokens=7, progress=False)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="label_noise"):
        OverOptConfig(label_noise=0.6)
    with pytest.raises(ValueError, match="n_max: must be >= 1"):
        OverOptConfig(n_max=0)
    with pytest.raises(ValueError, match="temperature"):
        OverOptConfig(temperature=0)


@pytest.mark.slow
def test_overopt_runs_end_to_end_and_resumes(tmp_path, tiny_backbone, monkeypatch):
    pipeline = tmp_path / "proxies.yaml"
    pipeline.write_text(yaml.safe_dump(job_config_dict(tmp_path, tiny_backbone, labels={"source": "none"})))
    config = OverOptConfig(
        output_dir=str(tmp_path / "overopt"),
        pipeline=str(pipeline),
        ensemble_size=2,
        gold_extra_records=8,
        gold_epochs=1,
        prompts_per_category=2,
        n_max=4,
        max_new_tokens=6,
        generator=tiny_backbone,
    )
    results = run_overopt(config, progress=False)
    out = tmp_path / "overopt"
    for name in ("results.json", "report.md", "gold_vs_kl.png", "length_vs_kl.png", "samples.sqlite"):
        assert (out / name).exists(), name
    assert results["prompts"] == 4 and results["samples"] == 16
    assert results["gold_train_records"] == results["proxy_train_records"] + 2 * 8
    curves = results["curves"]
    assert set(curves) == {
        "gold (oracle)",
        "DMoERM",
        "single RM",
        "RM ensemble (mean, N=2)",
        "RM ensemble (min, N=2)",
        "RM ensemble (uwo, N=2)",
    }
    for c in curves.values():
        assert c["ns"] == [1, 2, 4]
        np.testing.assert_allclose(c["kl"], bon_kl(np.array([1, 2, 4])))
        assert abs(c["gold"][0]) < 1e-6  # n = 1: the mean sample, the zero of the gold scale
        assert len(c["length"]) == 3
    oracle = curves["gold (oracle)"]["gold"]
    assert oracle == sorted(oracle)  # best-of-n by the gold itself can only gain
    for c in curves.values():  # no proxy beats the oracle
        assert all(g <= o + 1e-9 for g, o in zip(c["gold"], oracle))
    assert json.loads((out / "results.json").read_text())["curves"].keys() == curves.keys()
    assert "| n | KL (nats) |" in (out / "report.md").read_text()

    # A rerun trains and samples nothing again.
    def boom(*a, **k):
        raise AssertionError("finished work ran again")

    monkeypatch.setattr("dmoerm.training.single.train_expert", boom)
    monkeypatch.setattr("dmoerm.sampling._load_generator", boom)
    for name in ("train_router", "train_phase1", "train_phase3"):
        monkeypatch.setattr(f"dmoerm.pipeline.stages.{name}", boom)
    assert run_overopt(config, progress=False)["curves"] == curves
