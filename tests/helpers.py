"""Small builders shared by tests (records with a known preference rule)."""

from __future__ import annotations

import contextlib
import random
import threading

from dmoerm.data import Message, PreferenceRecord

WORDS = "the quick brown fox jumps over lazy dog paris capital france water boils helpful answer".split()


def length_records(n: int, seed: int = 0, category: str | None = None) -> list[PreferenceRecord]:
    """Pairs where the longer response is chosen: a rule a tiny model can learn in a few steps."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) + f" #{i}"
        short = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
        long = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 16)))
        out.append(
            PreferenceRecord.from_pair(
                [Message("user", prompt)], long, short, category=category, source="test", uid=str(i)
            )
        )
    return out


def tiny_taxonomy():
    """Two categories, three capability points: enough for routing, several experts and one lone expert."""
    from dmoerm.taxonomy import Capability, Category, Taxonomy

    return Taxonomy(
        name="tiny",
        categories=(
            Category(
                "code",
                "programming",
                (Capability("correctness", "is it right"), Capability("brevity", "is it short")),
            ),
            Category("chat", "talk", (Capability("empathy", "is it kind"),)),
        ),
    )


def add_capability_experts(model, taxonomy, with_rm: bool = True) -> None:
    """Every category's experts on ``model`` (its phase-1 ``<category>__rm`` first with ``with_rm``, then one per
    capability point, in the taxonomy's order, so their random starts are drawn alike) and a paper-MLP aggregator
    over the capability experts."""
    from dmoerm.aggregator import Aggregator
    from dmoerm.model import capability_expert_name, rm_expert

    for category in taxonomy.categories:
        if with_rm:
            model.bank.add_expert(rm_expert(category.name))
        names = [capability_expert_name(category.name, c.name) for c in category.capabilities]
        for name in names:
            model.bank.add_expert(name)
        model.aggregators[category.name] = Aggregator(len(names), model.bank.hidden_size)
        model.aggregator_experts[category.name] = names


def job_config_dict(tmp_path, tiny_backbone, **overrides) -> dict:
    """A pipeline config (as a dict) for a tiny job on two categories of length-rule pairs written under
    ``tmp_path``: a few seconds a phase on a tiny backbone."""
    from dmoerm.data import save_jsonl
    from dmoerm.taxonomy import save_taxonomy

    data = tmp_path / "prefs.jsonl"
    if not data.exists():
        save_jsonl(
            length_records(60, seed=1, category="code") + length_records(60, seed=2, category="chat"), data
        )
        save_taxonomy(tiny_taxonomy(), tmp_path / "taxonomy.yaml")
    fast = {"epochs": 1, "batch_size": 8, "learning_rate": 5e-3, "early_stopping_patience": 0}
    obj = {
        "output_dir": str(tmp_path / "run"),
        "model": {"backbone": tiny_backbone, "num_top_layers": 2, "trunk_dtype": "float32", "max_length": 64},
        "data": {
            "sources": [str(data)],
            "router_sources": [],
            "router_dev_sources": [],
            "taxonomy": str(tmp_path / "taxonomy.yaml"),
            "phase1_records": 12,
            "label_records": 6,
            "phase3_records": 12,
            "dev_records": 4,
            "test_records": 6,
        },
        # The tiny random judge gives noisy labels; margin consistency keeps some of every point (the default,
        # the paper's strict both-orders rule, keeps none of a judge that always answers one position).
        "labels": {
            "source": "local",
            "judge": {"dtype": "float32", "progress": False, "consistency": "margin"},
            "min_labels": 1,
        },
        "router": {"epochs": 3},
        "phase1": fast,
        "phase2": fast,
        "phase3": {"epochs": 2, "batch_size": 8},
    }
    obj.update(overrides)
    return obj


def job_config(tmp_path, tiny_backbone, **overrides):
    """:func:`job_config_dict` as a :class:`dmoerm.pipeline.PipelineConfig`."""
    from dmoerm.pipeline import PipelineConfig

    return PipelineConfig.from_dict(job_config_dict(tmp_path, tiny_backbone, **overrides))


@contextlib.contextmanager
def http_server(handler):
    """A real threaded HTTP server on 127.0.0.1 (a free port) for ``handler``; yields its ``http://host:port``."""
    from http.server import ThreadingHTTPServer

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def killed_in_epoch_two(train) -> None:
    """Run ``train()`` (a training call) with a kill at the start of its second epoch, after epoch 1's
    checkpoint: the interruption a rerun must resume from (raises when the kill never came)."""
    from dmoerm.training import loop

    original = loop.epoch_batches

    def crash(lengths, batch_size, seed, epoch):
        if epoch == 1:
            raise KeyboardInterrupt("killed")
        return original(lengths, batch_size, seed, epoch)

    loop.epoch_batches = crash
    try:
        train()
        raise AssertionError("the interruption did not happen")
    except KeyboardInterrupt:
        pass
    finally:
        loop.epoch_batches = original


def marker_records(n: int, seed: int = 0, longer_share: float = 0.8) -> list[PreferenceRecord]:
    """Pairs a first word decides ("water" chosen, "boils" rejected), where the chosen response is also the
    longer one in about ``longer_share`` of them: length is a shortcut that holds there and fails at 0."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) + f" #{i}"
        short = " ".join(rng.choice(WORDS[:8]) for _ in range(rng.randint(1, 3)))
        long = " ".join(rng.choice(WORDS[:8]) for _ in range(rng.randint(10, 16)))
        chosen, rejected = (long, short) if rng.random() < longer_share else (short, long)
        out.append(
            PreferenceRecord.from_pair(
                [Message("user", prompt)], "water " + chosen, "boils " + rejected, source="test", uid=str(i)
            )
        )
    return out
