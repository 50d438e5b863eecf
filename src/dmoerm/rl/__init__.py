"""Rewards for RL: a TRL-style reward function backed by a Scorer or a reward server, a verl custom reward
function, and reward normalization.

- :mod:`dmoerm.rl.reward_fn`: :func:`make_reward_fn` for TRL's ``GRPOTrainer`` / ``RLOOTrainer``, and the
  TRL prompt/completion converters :func:`to_conversation`, :func:`completion_text`.
- :mod:`dmoerm.rl.verl`: :func:`compute_score` / :func:`compute_score_batch` (``custom_reward_function.path=
  pkg://dmoerm.rl``), backed by a reward server or an in-process model; :func:`configure_verl`.
- :mod:`dmoerm.rl.normalization`: :func:`compute_normalization` measures the mean and standard deviation of a
  scorer's raw rewards on a reference set and writes them to ``<model_dir>/reward_normalization.json``; the
  reward server and :func:`make_reward_fn` then return ``(reward - mean) / std`` unless told not to.
"""

from dmoerm.rl.normalization import (
    NORMALIZATION_FILE,
    NormalizeModelConfig,
    RewardNormalization,
    compute_normalization,
    load_normalization,
    normalize_model,
    save_normalization,
)
from dmoerm.rl.reward_fn import completion_text, make_reward_fn, to_conversation
from dmoerm.rl.verl import (
    VERL_MODEL_ENV,
    VERL_PROMPT_KEYS,
    VERL_TOKEN_ENV,
    VERL_URL_ENV,
    compute_score,
    compute_score_batch,
    configure_verl,
    verl_reward_fn,
)

__all__ = [
    "NORMALIZATION_FILE",
    "NormalizeModelConfig",
    "RewardNormalization",
    "VERL_MODEL_ENV",
    "VERL_PROMPT_KEYS",
    "VERL_TOKEN_ENV",
    "VERL_URL_ENV",
    "completion_text",
    "compute_normalization",
    "compute_score",
    "compute_score_batch",
    "configure_verl",
    "load_normalization",
    "make_reward_fn",
    "normalize_model",
    "save_normalization",
    "to_conversation",
    "verl_reward_fn",
]
