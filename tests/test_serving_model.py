"""``dmoerm serve`` / ``dmoerm normalize`` as library calls: real saved models (single and DMoERM) behind the
server over HTTP on 127.0.0.1, normalization measured with :func:`dmoerm.rl.normalize_model`, config checks.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from dmoerm.data import PreferenceRecord, save_jsonl
from dmoerm.experts import BackboneConfig
from dmoerm.model import load_model, new_dmoerm, rm_expert
from dmoerm.reward_model import RewardModel
from dmoerm.rl import NORMALIZATION_FILE, NormalizeModelConfig, load_normalization, normalize_model
from dmoerm.serving import ServeModelConfig, build_model_app
from dmoerm.taxonomy import Capability, Category, Taxonomy
from test_serving import CONVERSATIONS, RESPONSES, ServerThread, items_payload

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TAXONOMY = Taxonomy(
    name="tiny",
    categories=(
        Category("code", "programming", (Capability("correctness", "right"), Capability("brevity", "short"))),
        Category("chat", "talk", (Capability("empathy", "kind"),)),
    ),
)


def _backbone_config(tiny_backbone: str) -> BackboneConfig:
    return BackboneConfig(backbone=tiny_backbone, trunk_dtype="float32", max_length=128, num_top_layers=1)


@pytest.fixture(scope="module")
def single_dir(tiny_backbone, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("single_rm")
    torch.manual_seed(0)
    RewardModel.create(_backbone_config(tiny_backbone), init_lora_weights=False).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def dmoerm_dir(tiny_backbone, tmp_path_factory) -> str:
    """An untrained DMoERM (random router, experts and heads): enough to check what the server returns."""
    folder = tmp_path_factory.mktemp("dmoerm")
    torch.manual_seed(0)
    model = new_dmoerm(_backbone_config(tiny_backbone), TAXONOMY, ["code", "chat"], init_lora_weights=False)
    for category in model.categories:
        model.bank.add_expert(rm_expert(category))
    for name in ("code__correctness", "code__brevity", "chat__empathy"):
        model.bank.add_expert(name)
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("reference") / "reference.jsonl"
    records = [
        PreferenceRecord.from_pair(c, r, r[::-1] + " extra words", source="test", uid=str(i))
        for i, (c, r) in enumerate(zip(CONVERSATIONS, RESPONSES, strict=True))
    ]
    save_jsonl(records, path)
    return str(path)


# ----------------------------------------------------------------------------------------------------------
# normalize_model


def test_normalize_model_measures_and_stores(single_dir, reference_file):
    norm = normalize_model(NormalizeModelConfig(model_dir=single_dir, source=reference_file, batch_size=4))
    assert norm.count == 8  # two responses per record
    stored = json.loads((Path(single_dir) / NORMALIZATION_FILE).read_text())
    assert stored["mean"] == norm.mean and stored["std"] == norm.std
    assert stored["source"] == reference_file and stored["records"] == 4
    # The same figures as scoring the reference responses directly.
    model = load_model(single_dir)
    convs = [c for c in CONVERSATIONS for _ in range(2)]
    resps = [x for r in RESPONSES for x in (r, r[::-1] + " extra words")]
    raw = torch.tensor([o.reward for o in model.score(convs, resps)], dtype=torch.float64)
    assert norm.mean == pytest.approx(float(raw.mean()), abs=1e-5)
    assert norm.std == pytest.approx(float(raw.std(unbiased=False)), abs=1e-5)
    assert load_normalization(single_dir) == norm


def test_normalize_model_dry_run_and_limit(dmoerm_dir, reference_file):
    norm = normalize_model(
        NormalizeModelConfig(model_dir=dmoerm_dir, source=reference_file, limit=2, dry_run=True)
    )
    assert norm.count == 4
    assert not (Path(dmoerm_dir) / NORMALIZATION_FILE).exists()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"model_dir": ""}, "model_dir"),
        ({"model_dir": "m", "source": ""}, "source"),
        ({"model_dir": "m", "limit": -1}, "limit"),
        ({"model_dir": "m", "batch_size": 0}, "batch_size"),
        ({"model_dir": "m", "torch_threads": 0}, "torch_threads"),
        ({"model_dir": "m", "dry_run": "yes"}, "dry_run"),
    ],
)
def test_normalize_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        NormalizeModelConfig(**kwargs)


def test_normalize_model_bad_source_and_dir(single_dir, tmp_path):
    with pytest.raises(ValueError, match="^source:"):
        normalize_model(NormalizeModelConfig(model_dir=single_dir, source="no/such_source"))
    with pytest.raises(ValueError, match="^model_dir:"):
        normalize_model(NormalizeModelConfig(model_dir=str(tmp_path / "missing")))


# ----------------------------------------------------------------------------------------------------------
# build_model_app / serve_model


def test_served_single_model_matches_in_process(single_dir, reference_file):
    normalize_model(NormalizeModelConfig(model_dir=single_dir, source=reference_file))
    norm = load_normalization(single_dir)
    model = load_model(single_dir)
    app = build_model_app(ServeModelConfig(model_dir=single_dir, max_wait_ms=1))
    texts = [
        model.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in c] + [{"role": "assistant", "content": r}],
            tokenize=False,
        )
        for c, r in zip(CONVERSATIONS, RESPONSES, strict=True)
    ]
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        raw = [o.reward for o in model.score(CONVERSATIONS, RESPONSES)]
        body = c.post("/score", json=items_payload(CONVERSATIONS, RESPONSES)).json()
        assert body["normalized"] is True
        assert [x["raw_reward"] for x in body["results"]] == pytest.approx(raw, abs=1e-5)
        assert [x["reward"] for x in body["results"]] == pytest.approx(norm.apply(raw), abs=1e-5)
        assert body["results"][0]["category"] is None and body["results"][0]["capability_scores"] == {}
        got = c.post("/get_reward", json={"query": texts, "normalize": False}).json()["rewards"]
        assert got == pytest.approx(model.score_texts(texts), abs=1e-5)
        r = c.post("/get_reward", json={"query": ["word " * 200]})  # over max_length=128 tokens
        assert r.status_code == 413 and r.json()["error"]["code"] == "input_too_long"
        assert c.get("/health").json()["max_length"] == 128


def test_served_dmoerm_returns_category_and_capabilities(dmoerm_dir):
    model = load_model(dmoerm_dir)
    want = model.score(CONVERSATIONS, RESPONSES)
    app = build_model_app(ServeModelConfig(model_dir=dmoerm_dir, max_wait_ms=1))
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        body = c.post("/score", json=items_payload(CONVERSATIONS, RESPONSES)).json()
    assert body["normalized"] is False
    for got, w in zip(body["results"], want, strict=True):
        assert got["reward"] == pytest.approx(w.reward, abs=1e-5)
        assert got["category"] == w.category and got["category"] in ("code", "chat")
        assert got["category_probability"] == pytest.approx(w.category_probability, abs=1e-5)
        assert got["capability_scores"].keys() == w.capability_scores.keys()
        assert list(got["capability_scores"].values()) == pytest.approx(
            list(w.capability_scores.values()), abs=1e-5
        )


def test_token_file(single_dir, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("file-token-123\n")
    app = build_model_app(ServeModelConfig(model_dir=single_dir, token_file=str(token_file), warmup=False))
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url) as c:
        assert c.post("/get_reward", json={"query": ["hi"]}).status_code == 401
        ok = c.post("/get_reward", json={"query": ["hi"]}, headers={"Authorization": "Bearer file-token-123"})
        assert ok.status_code == 200
    token_file.write_text("")
    with pytest.raises(ValueError, match="^token_file:.*empty"):
        build_model_app(ServeModelConfig(model_dir=single_dir, token_file=str(token_file)))
    token_file.write_text("has a space\n")
    with pytest.raises(ValueError, match="^token_file:"):
        build_model_app(ServeModelConfig(model_dir=single_dir, token_file=str(token_file)))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({}, "model_dir"),
        ({"model_dir": " "}, "model_dir"),
        ({"model_dir": "m", "port": 70000}, "port"),
        ({"model_dir": "m", "port": "80"}, "port"),
        ({"model_dir": "m", "host": ""}, "host"),
        ({"model_dir": "m", "token": "t", "token_file": "f"}, "token_file"),
        ({"model_dir": "m", "max_batch_size": 0}, "max_batch_size"),
        ({"model_dir": "m", "warmup": 1}, "warmup"),
    ],
)
def test_serve_model_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        ServeModelConfig(**kwargs)


def test_build_model_app_rejects_missing_dir(tmp_path):
    with pytest.raises(ValueError, match="^model_dir:"):
        build_model_app(ServeModelConfig(model_dir=str(tmp_path / "nope")))


@pytest.mark.slow
def test_serve_model_in_a_child_process(single_dir):
    """The blocking ``serve_model`` as ``dmoerm serve`` runs it: a child process, a real port, then SIGTERM."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "import logging; logging.basicConfig(level=logging.INFO);"
        "from dmoerm.serving import ServeModelConfig, serve_model;"
        f"serve_model(ServeModelConfig(model_dir={single_dir!r}, port={port}, log_level='warning'))"
    )
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert child.poll() is None, child.stderr.read()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        model = load_model(single_dir)
        raw = [o.reward for o in model.score(CONVERSATIONS, RESPONSES)]
        body = httpx.post(f"{url}/score", json=items_payload(CONVERSATIONS, RESPONSES), timeout=30).json()
        assert [x["raw_reward"] for x in body["results"]] == pytest.approx(raw, abs=1e-5)
    finally:
        child.terminate()
        child.wait(timeout=30)
    assert "loaded RewardModel" in child.stderr.read()
