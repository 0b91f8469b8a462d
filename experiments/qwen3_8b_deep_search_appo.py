"""Qwen3-8B, deep search on hard_search_1k (tool-call limit 6), algorithm appo.

Official hyperparameters (docs/algorithm.md §1.8), sized for a TPU pod / multi-GPU host; see appo_jax.training.paper.
"""
from appo_jax.training.paper import paper_config


def get_config():
    return paper_config("qwen3-8b-deep-search", "appo")
