"""Llama-3.1-8B-Instruct, reasoning on train_10k, algorithm appo.

Official hyperparameters (docs/algorithm.md §1.8), sized for a TPU pod / multi-GPU host; see appo_jax.training.paper.
"""
from appo_jax.training.paper import paper_config


def get_config():
    return paper_config("llama3.1-8b-reasoning", "appo")
