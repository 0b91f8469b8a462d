"""Table 1 of the APPO paper: tool-integrated deep reasoning on 10 benchmarks (docs/paper_configs.md).

    appo-jax train --config experiments/paper/table1_reasoning.py:qwen2.5-7b,appo            # the paper's set
    appo-jax train --config experiments/paper/table1_reasoning.py:qwen2.5-7b,appo,official   # the official scripts'

The argument selects a row, ``<backbone>,<method>[,official]``. Backbones: ``qwen2.5-7b`` (Qwen2.5-7B-Instruct)
and ``llama3.1-8b`` (Llama-3.1-8B-Instruct), read from ``$APPO_MODELS/<HF repo name>`` (default ``~/models``) or
``--set model.name=/path``. Methods: the RL methods the table compares, ``grpo``, ``reinforce_pp``, ``dapo``,
``gppo``, ``cispo``, ``gigpo``, ``arpo``, ``appo``; all train on the 10k math + QA RL set with the python and
search tools at the same budget (16 rollouts per prompt). The hyperparameters (the paper's text by default, the
official scripts with ``,official``) are `appo_jax.training.paper_hyperparameters` (setup ``reasoning``). The
table's Zero-shot and TIR Prompting rows train nothing: ``appo-jax eval`` of the backbone.
"""
from appo_jax.training.config import ExperimentConfig
from appo_jax.training.paper_hyperparameters import paper_config, select_row

BACKBONES = {"qwen2.5-7b": "Qwen2.5-7B-Instruct", "llama3.1-8b": "Llama-3.1-8B-Instruct"}
METHODS = ("grpo", "reinforce_pp", "dapo", "gppo", "cispo", "gigpo", "arpo", "appo")
ROWS = tuple(f"{b},{m}" for b in BACKBONES for m in METHODS)


def get_config(arg: str = "qwen2.5-7b,appo") -> ExperimentConfig:
    row, hp_set = select_row(arg, ROWS, "table1_reasoning")
    backbone, method = row.split(",")
    return paper_config("reasoning", hp_set, model=BACKBONES[backbone], algorithm=method,
                        name=f"table1-{backbone}-{method}", workdir=f"runs/table1/{backbone}-{method}")
