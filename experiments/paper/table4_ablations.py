"""Table 4 of the APPO paper: component ablations of APPO on the Table 1 setup (official-script hyperparameters).

    appo-jax train --config experiments/paper/table4_ablations.py:llama3.1-8b,entropy_only

The argument selects a row: ``<backbone>,<ablation>`` with the backbones of Table 1 and the ablations
``appo`` (the full method), ``entropy_only`` (Branching Score -> entropy), ``omega_only``, ``no_prefix_credit``,
``no_procedure_scaling`` and ``no_future_kl`` (the paper's "w/o dual-group" row is not implemented yet).
Everything else is the Table 1 APPO row; the ablation only changes ``algorithm.name``.
"""
import importlib.util
import os

from appo_jax.training.config import ConfigError, ExperimentConfig

ABLATIONS = {"appo": "appo", "entropy_only": "appo_entropy_only", "omega_only": "appo_omega_only",
             "no_prefix_credit": "appo_no_prefix_credit", "no_procedure_scaling": "appo_no_procedure_scaling",
             "no_future_kl": "appo_no_future_kl"}
ROWS = tuple(f"{b},{a}" for b in ("qwen2.5-7b", "llama3.1-8b") for a in ABLATIONS)


def _table1():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "table1_reasoning.py")
    spec = importlib.util.spec_from_file_location("table1_reasoning", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str = "qwen2.5-7b,appo") -> ExperimentConfig:
    backbone, _, ablation = arg.partition(",")
    if arg not in ROWS:
        raise ConfigError(f"table4_ablations row {arg!r}; expected <backbone>,<ablation> with ablation in "
                          f"{', '.join(ABLATIONS)}")
    c = _table1().get_config(f"{backbone},appo")
    c.algorithm.name = ABLATIONS[ablation]
    c.name, c.workdir = f"table4-{backbone}-{ablation}", f"runs/table4/{backbone}-{ablation}"
    return c
