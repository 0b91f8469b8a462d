"""Evaluation as the paper runs it: every answer saved (and resumable), the paper's metrics, the LLM judge's use.

`answer_store` (one JSONL row per benchmark, question and run; resume; refusal of mixed settings), `metrics`
(pass@1 over runs, unbiased pass@k, F1 / EM, judge accuracy, breakdowns), `runner` (the rollouts and the judging),
`commands` (``appo-jax eval``). The sampling presets live with the rollout config (`appo_jax.rollout.presets`),
the judges with the rewards (`appo_jax.rewards.judge`, `appo_jax.rewards.llm_judge`).
"""
