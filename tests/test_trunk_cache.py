"""The trunk cache's keys and its on-disk layer (issue 13's disk cache, issue 14 item 8).

A state is keyed by the trunk's content identity (weights, config, split, dtype) and the token ids: a hit from
disk returns the exact tensors, another backbone, dtype or split misses, in memory and on disk alike; a corrupted
entry or database is recomputed with a warning.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3

import pytest
import torch

from conftest import build_tiny_backbone
from dmoerm.encoding import encode_record
from dmoerm.experts import BackboneConfig, ExpertBank
from dmoerm.training.trunk_cache import TrunkCache
from dmoerm.training.trunk_store import DB_NAME
from helpers import length_records

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _bank(backbone: str, trunk_dtype: str = "bfloat16", num_top_layers: int = 1) -> ExpertBank:
    config = BackboneConfig(
        backbone=backbone, num_top_layers=num_top_layers, trunk_dtype=trunk_dtype, max_length=64
    )
    return ExpertBank(config)


@pytest.fixture(scope="module")
def bank(tiny_backbone) -> ExpertBank:
    return _bank(tiny_backbone)


@pytest.fixture(scope="module")
def inputs(bank):
    items = [encode_record(bank.tokenizer, r, 64) for r in length_records(5, seed=3)]
    return [e for item in items for e in item.inputs]


def _fresh(bank, inputs):
    """What the trunk computes now, without any cache."""
    return TrunkCache().get(bank, inputs)


def test_a_disk_hit_returns_the_exact_tensors_in_a_new_cache(bank, inputs, tmp_path):
    cold = TrunkCache(directory=tmp_path / "states")
    first = cold.get(bank, inputs)
    assert cold.misses == len(inputs) and cold.disk_hits == 0
    assert (tmp_path / "states" / DB_NAME).exists() and len(cold.store) == len(inputs)
    warm = TrunkCache(directory=tmp_path / "states")  # another run: empty memory, same folder
    again = warm.get(bank, inputs)
    assert warm.misses == 0 and warm.disk_hits == len(inputs) and warm.hits == 0
    for a, b, c in zip(first, again, _fresh(bank, inputs), strict=True):
        assert a.dtype == b.dtype == torch.bfloat16
        assert torch.equal(a, b) and torch.equal(b, c)
    warm.get(bank, inputs)  # now from memory
    assert warm.hits == len(inputs) and warm.disk_hits == len(inputs)


def test_another_backbone_dtype_or_split_misses_on_disk(bank, inputs, tiny_backbone, tmp_path_factory):
    folder = tmp_path_factory.mktemp("trunk_keys")
    TrunkCache(directory=folder).get(bank, inputs)
    other_weights = build_tiny_backbone(tmp_path_factory.mktemp("other_seed"), seed=1)
    same_weights_elsewhere = tmp_path_factory.mktemp("copy") / "backbone"
    shutil.copytree(tiny_backbone, same_weights_elsewhere)
    for other, expect_hit in [
        (_bank(other_weights), False),
        (_bank(tiny_backbone, trunk_dtype="float32"), False),
        (_bank(tiny_backbone, num_top_layers=2), False),
        (_bank(str(same_weights_elsewhere)), True),  # content-addressed: the folder's name does not matter
    ]:
        cache = TrunkCache(directory=folder)
        states = cache.get(other, inputs)
        assert (cache.disk_hits, cache.misses) == ((len(inputs), 0) if expect_hit else (0, len(inputs)))
        for a, b in zip(states, _fresh(other, inputs), strict=True):
            assert torch.equal(a, b)


def test_one_memory_cache_keeps_models_on_different_trunks_apart(bank, inputs, tiny_backbone):
    cache = TrunkCache()
    ours = cache.get(bank, inputs)
    other = _bank(tiny_backbone, num_top_layers=2)  # one more layer on top: a shallower trunk
    theirs = cache.get(other, inputs)
    assert cache.misses == 2 * len(inputs) and len(cache) == 2 * len(inputs)
    for a, b, c in zip(ours, theirs, _fresh(other, inputs), strict=True):
        assert torch.equal(b, c) and not torch.equal(a, b)


def test_a_corrupted_entry_is_recomputed_with_a_warning(bank, inputs, tmp_path, caplog):
    expected = TrunkCache(directory=tmp_path).get(bank, inputs)
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        key, data = conn.execute("SELECT key, data FROM states ORDER BY key LIMIT 1").fetchone()
        flipped = bytes([data[0] ^ 0xFF]) + data[1:]
        conn.execute("UPDATE states SET data = ? WHERE key = ?", (flipped, key))
    cache = TrunkCache(directory=tmp_path)
    with caplog.at_level(logging.WARNING, logger="dmoerm.training.trunk_store"):
        states = cache.get(bank, inputs)
    assert f"trunk cache entry {key[:16]} is corrupted" in caplog.text and str(tmp_path) in caplog.text
    assert (cache.disk_hits, cache.misses) == (len(inputs) - 1, 1)
    for a, b in zip(states, expected, strict=True):
        assert torch.equal(a, b)
    caplog.clear()
    healed = TrunkCache(directory=tmp_path)
    healed.get(bank, inputs)  # the recomputed state was written back
    assert healed.disk_hits == len(inputs) and "corrupted" not in caplog.text


def test_an_unreadable_database_is_moved_aside_and_rebuilt(bank, inputs, tmp_path, caplog):
    (tmp_path / DB_NAME).write_bytes(b"this is not an SQLite database" * 100)
    with caplog.at_level(logging.WARNING, logger="dmoerm.training.trunk_store"):
        states = TrunkCache(directory=tmp_path).get(bank, inputs)
    assert "unreadable trunk cache" in caplog.text and str(tmp_path / DB_NAME) in caplog.text
    assert len(list(tmp_path.glob(f"{DB_NAME}.corrupt-*"))) == 1
    for a, b in zip(states, _fresh(bank, inputs), strict=True):
        assert torch.equal(a, b)
    assert TrunkCache(directory=tmp_path).get(bank, inputs[:2]) and len(
        TrunkCache(directory=tmp_path).store
    ) == len(inputs)


def test_the_pipeline_config_names_the_cache_folder(tmp_path, tiny_backbone, monkeypatch):
    from dmoerm.pipeline import run as pipeline
    from helpers import job_config

    config = job_config(tmp_path, tiny_backbone, trunk_cache_dir=str(tmp_path / "states"))
    assert config.trunk_cache_dir == str(tmp_path / "states")
    assert job_config(tmp_path, tiny_backbone).trunk_cache_dir is None
    seen = []

    class Stop(Exception):
        pass

    def spy(max_bytes, directory=None):
        seen.append((max_bytes, directory))
        raise Stop

    monkeypatch.setattr(pipeline, "TrunkCache", spy)
    with pytest.raises(Stop):
        pipeline.run_pipeline(config, progress=False)
    assert seen == [(int(config.trunk_cache_gb * (1 << 30)), str(tmp_path / "states"))]


def test_a_failed_write_is_a_warning_and_the_run_goes_on(bank, inputs, tmp_path, caplog, monkeypatch):
    """A full disk or read-only folder must not stop training: states are still returned, from memory."""
    TrunkCache(directory=tmp_path).get(bank, inputs[:1])  # creates the database
    cache = TrunkCache(directory=tmp_path)
    path = tmp_path / DB_NAME
    monkeypatch.setattr(cache.store, "_open", lambda: sqlite3.connect(f"file:{path}?mode=ro", uri=True))
    with caplog.at_level(logging.WARNING, logger="dmoerm.training.trunk_store"):
        states = cache.get(bank, inputs)
    assert "trunk cache write failed" in caplog.text and str(path) in caplog.text
    for a, b in zip(states, _fresh(bank, inputs), strict=True):
        assert torch.equal(a, b)
    assert len(TrunkCache(directory=tmp_path).store) == 1  # nothing half-written
