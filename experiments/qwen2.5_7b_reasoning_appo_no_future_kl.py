"""Qwen2.5-7B-Instruct, reasoning with python + search on train_10k, algorithm appo_no_future_kl.

Official hyperparameters (docs/algorithm.md §1.8), sized for a TPU pod / multi-GPU host; see appo_jax.training.paper.
"""
from appo_jax.training.paper import paper_config


def get_config():
    return paper_config("qwen2.5-7b-reasoning", "appo_no_future_kl")
