"""Table 2 of the APPO paper: deep search on GAIA, WebWalkerQA, HLE and xbench (docs/paper_configs.md).

    appo-jax train --config experiments/paper/table2_deep_search.py:qwen3-8b,appo            # the paper's set
    appo-jax train --config experiments/paper/table2_deep_search.py:qwen3-14b,appo,official  # the official scripts'

The argument selects a row, ``<backbone>,<method>[,official]``. Backbones: ``qwen3-8b`` and ``qwen3-14b``
(Qwen3-8B / Qwen3-14B from ``$APPO_MODELS/<HF repo name>``, default ``~/models``); methods: ``grpo``, ``arpo``,
``appo``. Training data: the 1k hard-search RL set, 6 tool calls per rollout. The hyperparameters are
`appo_jax.training.paper_hyperparameters` (setups ``deep_search_8b`` / ``deep_search_14b``: the official
scripts differ between the two in batch, lengths and n). The table's "base" rows train nothing:
``appo-jax eval`` of the backbone.
"""
from appo_jax.training.config import ExperimentConfig
from appo_jax.training.paper_hyperparameters import paper_config, select_row

#: backbone -> (HF repo name, setup of appo_jax.training.paper_hyperparameters)
BACKBONES = {"qwen3-8b": ("Qwen3-8B", "deep_search_8b"), "qwen3-14b": ("Qwen3-14B", "deep_search_14b")}
METHODS = ("grpo", "arpo", "appo")
ROWS = tuple(f"{b},{m}" for b in BACKBONES for m in METHODS)


def get_config(arg: str = "qwen3-8b,appo") -> ExperimentConfig:
    row, hp_set = select_row(arg, ROWS, "table2_deep_search")
    backbone, method = row.split(",")
    repo, setup = BACKBONES[backbone]
    return paper_config(setup, hp_set, model=repo, algorithm=method, name=f"table2-{backbone}-{method}",
                        workdir=f"runs/table2/{backbone}-{method}")
