"""The server in the formats RL frameworks speak (issue 15 item 3), over real HTTP on 127.0.0.1, with the exact
request bodies OpenRLHF and verl send and the way each reads the answer (their source is quoted in
``dmoerm/serving/formats.py`` and ``docs/serving.md``), on a tiny saved single reward model and DMoERM."""

from __future__ import annotations

import math

import httpx
import pytest
import torch

from dmoerm.model import load_model
from dmoerm.outputs import RewardOutput
from dmoerm.rl import RewardNormalization, save_normalization
from dmoerm.serving import ServeConfig, ServeModelConfig, build_model_app, create_app
from test_serving import CONVERSATIONS, RESPONSES, ServerThread, TinyScorer, items_payload
from test_serving_model import TAXONOMY, dmoerm_dir, single_dir  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _chat(conversation, response=None):
    turns = [{"role": m.role, "content": m.content} for m in conversation]
    return turns + ([{"role": "assistant", "content": response}] if response is not None else [])


def _openrlhf_bodies(tokenizer):
    """What OpenRLHF's SingleTurnAgentExecutor posts (openrlhf/utils/agent.py lines 283-287 and 332-336): one
    query per request, the decoded prompt+response tokens (special tokens kept), the prompt, the label.

    The response tokens here are the chat template's own assistant turn, so the same tokens reach the model
    as through ``DMoERM.score`` and the breakdown can be checked against it."""
    bodies = []
    for conversation, response in zip(CONVERSATIONS, RESPONSES, strict=True):
        prompt = tokenizer.apply_chat_template(
            _chat(conversation), add_generation_prompt=True, tokenize=False
        )
        full = tokenizer.apply_chat_template(_chat(conversation, response), tokenize=False)
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        query = tokenizer.decode(ids, skip_special_tokens=False)
        bodies.append({"query": [query], "prompts": [prompt], "labels": [None]})
    return bodies


@pytest.fixture(scope="module")
def dmoerm_server(dmoerm_dir):  # noqa: F811
    app = build_model_app(ServeModelConfig(model_dir=dmoerm_dir, max_wait_ms=1))
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        yield client, load_model(dmoerm_dir)


@pytest.fixture(scope="module")
def single_server(single_dir):  # noqa: F811
    save_normalization(single_dir, RewardNormalization(mean=0.25, std=2.0, count=10))
    app = build_model_app(ServeModelConfig(model_dir=single_dir, max_wait_ms=1))
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        yield client, load_model(single_dir)


EXPECTED_KEYS = [
    "category_index",
    "category_probability",
    "category/code",
    "category/chat",
    "capability/code/correctness",
    "capability/code/brevity",
    "capability/code/rm",
    "capability/chat/empathy",
    "capability/chat/rm",
]


def test_openrlhf_get_reward_carries_the_dmoerm_breakdown(dmoerm_server):
    http, model = dmoerm_server
    bodies = _openrlhf_bodies(model.tokenizer)
    answers = []
    for body in bodies:
        r = http.post("/get_reward", json=body)
        assert r.status_code == 200, r.text
        answers.append(r.json())
    queries = [b["query"][0] for b in bodies]
    want = model.score_texts(queries)
    by_chat = model.score(CONVERSATIONS, RESPONSES)
    for answer, reward, w in zip(answers, want, by_chat, strict=True):
        assert set(answer) == {"rewards", "scores", "extra_logs"}
        assert answer["rewards"] == pytest.approx([reward], abs=1e-5)
        assert answer["scores"] == answer["rewards"]
        logs = answer["extra_logs"]
        assert list(logs) == EXPECTED_KEYS  # the same keys in every answer, whatever the route
        assert all(isinstance(v, list) and len(v) == 1 for v in logs.values())
        # The router's choice, its probability and the chosen category's capability scores, as score() says.
        assert model.categories[int(logs["category_index"][0])] == w.category
        assert (
            logs[f"category/{w.category}"] == [1.0]
            and sum(logs[f"category/{c}"][0] for c in ("code", "chat")) == 1
        )
        assert logs["category_probability"][0] == pytest.approx(w.category_probability, abs=1e-5)
        for capability, value in w.capability_scores.items():
            assert logs[f"capability/{w.category}/{capability}"][0] == pytest.approx(value, abs=1e-5)
    # How OpenRLHF consumes them: HEAD (samples_generator.py lines 293-297) makes one tensor per key and
    # item; before 6298708 (experience_maker.py update_samples_with_rewards) it concatenated over answers.
    for answer in answers:
        for value in answer["extra_logs"].values():
            assert torch.tensor([value]).shape == (1, 1)
    merged = {
        key: torch.cat([torch.as_tensor(a["extra_logs"][key]) for a in answers])
        for key in answers[0]["extra_logs"]
    }
    assert merged["category_probability"].shape == (len(answers),)


def test_openrlhf_batch_request_and_single_rm(single_server):
    http, model = single_server
    texts = [
        model.tokenizer.apply_chat_template(_chat(c, r), tokenize=False)
        for c, r in zip(CONVERSATIONS, RESPONSES, strict=True)
    ]
    body = {"query": texts, "prompts": ["p"] * len(texts), "labels": ["l"] * len(texts)}
    answer = http.post("/get_reward", json=body).json()
    raw = model.score_texts(texts)
    assert answer["rewards"] == pytest.approx([(r - 0.25) / 2.0 for r in raw], abs=1e-5)
    assert answer["scores"] == answer["rewards"]
    assert answer["extra_logs"] == {}  # a single reward model has no breakdown


def _verl_disrm_prompt(tokenizer, conversation, response) -> str:
    """verl/experimental/reward_loop/reward_loop.py lines 164-198 (_preprocess_reward_inputs)."""
    rm_prompt = tokenizer.apply_chat_template(
        _chat(conversation, response), add_generation_prompt=False, tokenize=False
    )
    if tokenizer.bos_token is not None and rm_prompt.startswith(tokenizer.bos_token):
        rm_prompt = rm_prompt[len(tokenizer.bos_token) :]
    return rm_prompt


def test_verl_classify_exact_body_and_read(single_server, single_dir):  # noqa: F811
    http, model = single_server
    for conversation, response in zip(CONVERSATIONS, RESPONSES, strict=True):
        rm_prompt = _verl_disrm_prompt(model.tokenizer, conversation, response)
        # reward_loop.py lines 206-213: the payload, the endpoint, and where the score is read.
        payloads = {"model": single_dir, "input": rm_prompt, "activation": False}
        output = http.post("/classify", json=payloads).json()
        rm_score = output["data"][-1]["probs"][-1]
        assert rm_score == pytest.approx((model.score_texts([rm_prompt])[0] - 0.25) / 2.0, abs=1e-5)
    # vLLM's ClassificationResponse / ClassificationData / UsageInfo shapes.
    assert set(output) == {"id", "object", "created", "model", "data", "usage"}
    assert output["id"].startswith("classify-") and output["object"] == "list"
    assert isinstance(output["created"], int) and output["model"] == single_dir  # echoed
    assert output["data"] == [{"index": 0, "label": "LABEL_0", "probs": [rm_score], "num_classes": 1}]
    n_tokens = len(model.tokenizer(rm_prompt, add_special_tokens=False)["input_ids"])
    assert output["usage"] == {
        "prompt_tokens": n_tokens,
        "total_tokens": n_tokens,
        "completion_tokens": 0,
        "prompt_tokens_details": None,
    }


def test_classify_activation_lists_messages_and_pooling(dmoerm_server):
    http, model = dmoerm_server
    texts = [_verl_disrm_prompt(model.tokenizer, c, r) for c, r in zip(CONVERSATIONS, RESPONSES, strict=True)]
    raw = model.score_texts(texts)
    # vLLM applies the model's activation unless told not to: a sigmoid for one label.
    default = http.post("/classify", json={"model": "rm", "input": texts}).json()
    assert [d["index"] for d in default["data"]] == list(range(len(texts)))
    assert [d["probs"][0] for d in default["data"]] == pytest.approx(
        [1 / (1 + math.exp(-r)) for r in raw], abs=1e-5
    )
    plain = http.post("/classify", json={"model": "rm", "input": texts, "use_activation": False}).json()
    assert [d["probs"][0] for d in plain["data"]] == pytest.approx(raw, abs=1e-5)
    # A chat (vLLM's ClassificationChatRequest) is scored as /score scores it.
    chat = _chat(CONVERSATIONS[1], RESPONSES[1])
    got = http.post("/classify", json={"model": "rm", "messages": chat, "activation": False}).json()
    want = http.post("/score", json=items_payload(CONVERSATIONS[1:2], RESPONSES[1:2])).json()
    assert got["data"][0]["probs"][0] == pytest.approx(want["results"][0]["reward"], abs=1e-6)
    pooled = http.post("/pooling", json={"model": "rm", "input": texts[:2], "use_activation": False}).json()
    assert pooled["id"].startswith("pool-") and pooled["object"] == "list"
    assert [d["object"] for d in pooled["data"]] == ["pooling", "pooling"]
    assert [d["data"][0] for d in pooled["data"]] == pytest.approx(raw[:2], abs=1e-5)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"model": "m", "input": [1, 2, 3]}, 422, "input[0]: token ids"),
        ({"model": "m"}, 422, "missing field 'input'"),
        ({"model": "m", "input": []}, 422, "input: empty list"),
        ({"model": "m", "input": "   "}, 422, "input[0]: expected a non-empty string"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, 422, "messages"),
        ({"model": "m", "input": "word " * 200}, 413, "tokens, over the limit of 128"),
    ],
)
def test_classify_bad_input_is_a_clear_4xx(dmoerm_server, body, status, message):
    http, _ = dmoerm_server
    r = http.post("/classify", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]


class BreakdownScorer(TinyScorer):
    """A scorer other than DMoERM that gives its own breakdown for rendered texts."""

    def score_texts_outputs(self, texts, batch_size=16):
        out = self._forward(list(texts), batch_size)
        return [
            RewardOutput(float(row[0]), "chat", 0.75, {"helpfulness": float(row[1]), "safety": float(row[2])})
            for row in out
        ]


def test_extra_logs_of_another_scorer_with_a_breakdown(tiny_backbone):
    scorer = BreakdownScorer(tiny_backbone)
    with ServerThread(create_app(scorer, ServeConfig(max_wait_ms=1))) as srv:
        answer = httpx.post(f"{srv.url}/get_reward", json={"query": ["a", "b c"]}, timeout=30).json()
        health = httpx.get(f"{srv.url}/health", timeout=30).json()
    want = scorer.score_texts_outputs(["a", "b c"])
    assert answer["rewards"] == pytest.approx([o.reward for o in want], abs=1e-5)
    logs = answer["extra_logs"]
    assert list(logs) == [
        "category_index",
        "category_probability",
        "category/chat",
        "capability/chat/helpfulness",
        "capability/chat/safety",
    ]
    assert logs["category_index"] == [0.0, 0.0] and logs["category/chat"] == [1.0, 1.0]
    assert logs["category_probability"] == pytest.approx([0.75, 0.75])
    for k in ("helpfulness", "safety"):
        assert logs[f"capability/chat/{k}"] == pytest.approx([o.capability_scores[k] for o in want], abs=1e-5)
    assert health["categories"] is None


def test_verl_compute_score_loads_a_model_dir_in_process(single_server, single_dir):  # noqa: F811
    from dmoerm import rl
    from dmoerm.data import Message
    from dmoerm.rl import verl

    _, model = single_server  # the fixture stored the normalization (0.25, 2.0) in single_dir
    try:
        got = rl.compute_score(
            "src", "Paris.", None, {"prompt": "Capital of France?"}, dmoerm_model_dir=single_dir
        )
    finally:
        verl._verl_backends.clear()
    raw = model.score([[Message("user", "Capital of France?")]], ["Paris."])[0].reward
    assert got == pytest.approx((raw - 0.25) / 2.0, abs=1e-5)
