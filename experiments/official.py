"""APPO as the official implementation computes it (AMAP-ML/APPO; docs/official_differences.md): the official
Branching Score end to end — Z-scores over every loss-mask token with ``std + 1e-6``, the whitespace-only filter
applied afterwards, the last position selectable and then dropped, and the token entropy from vLLM's top-10
log-probs (not renormalised) — on top of a row of Table 1 with the official scripts' hyperparameters
(``table1_reasoning.py:BACKBONE,appo,official``, docs/paper_configs.md) or the mini task.

    appo-jax train --config experiments/official.py:qwen2.5-7b            # Table 1, APPO row, official mode
    appo-jax train --config experiments/official.py:llama3.1-8b
    appo-jax train --config experiments/official.py:mini,arith_program,1  # the mini reproduction's task, seed 1

Everything else is the base config's; the switched values are `appo_jax.training.fidelity.OFFICIAL`.
"""
from pathlib import Path

from appo_jax.training.config import ConfigError, ExperimentConfig, load_config
from appo_jax.training.fidelity import official_fidelity

HERE = Path(__file__).resolve().parent


def get_config(arg: str = "qwen2.5-7b") -> ExperimentConfig:
    if arg.startswith("mini,"):
        cfg = load_config(f"{HERE / 'mini' / 'config.py'}:appo,{arg.removeprefix('mini,')}")
    elif "," not in arg:
        cfg = load_config(f"{HERE / 'paper' / 'table1_reasoning.py'}:{arg},appo,official")
    else:
        raise ConfigError(f"official config argument {arg!r}: expected a Table 1 backbone (qwen2.5-7b, "
                          f"llama3.1-8b) or mini,TASK,SEED")
    cfg.name = f"official-{cfg.name.removesuffix('-official')}"
    cfg.workdir = str(Path(cfg.workdir).parent / f"official-{Path(cfg.workdir).name.removesuffix('-official')}")
    return official_fidelity(cfg)
