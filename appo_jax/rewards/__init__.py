"""Rewards: answer extraction, SQuAD normalisation, F1 / EM, the ARPO format check and reward, math-verify
equivalence usable from any thread, and the judge hook."""
from appo_jax.rewards.answers import find_boxed, last_boxed
from appo_jax.rewards.arpo import RewardOutput, arpo_reward
from appo_jax.rewards.format_check import FormatCheck, check_format
from appo_jax.rewards.judge import Judge, JudgeVerdict, RuleBasedJudge, make_judge, register_judge
from appo_jax.rewards.math_equivalence import MathVerifier, math_equal
from appo_jax.rewards.normalize import answer_tokens, normalize_answer
from appo_jax.rewards.qa_metrics import exact_match, f1_score, token_f1
from appo_jax.rewards.registry import RecordReward, get_reward_fn, register_reward, reward_for_ability

__all__ = [
    "FormatCheck",
    "Judge",
    "JudgeVerdict",
    "MathVerifier",
    "RecordReward",
    "RewardOutput",
    "RuleBasedJudge",
    "answer_tokens",
    "arpo_reward",
    "check_format",
    "exact_match",
    "f1_score",
    "find_boxed",
    "get_reward_fn",
    "last_boxed",
    "make_judge",
    "math_equal",
    "normalize_answer",
    "register_judge",
    "register_reward",
    "reward_for_ability",
    "token_f1",
]
