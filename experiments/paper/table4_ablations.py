"""Table 4 of the APPO paper: component ablations of APPO on the Table 1 setup, scored on the knowledge-QA
benchmarks (docs/paper_configs.md).

    appo-jax train --config experiments/paper/table4_ablations.py:llama3.1-8b,entropy_only            # paper's set
    appo-jax train --config experiments/paper/table4_ablations.py:llama3.1-8b,entropy_only,official   # official

The argument selects a row, ``<backbone>,<ablation>[,official]`` with the backbones of Table 1. The table's rows:
``appo`` (APPO), ``entropy_only`` (BS->Entropy: the Branching Score is the entropy alone), ``no_future_kl`` (w/o
future-value advantage scaling: the loss without the future-KL weight, A~ = A), ``no_dual_group`` (w/o dual-group:
initial and branch rollouts normalised as one group). Ablations the paper does not report, also selectable:
``omega_only``, ``no_prefix_credit``, ``no_procedure_scaling``. Everything else is the Table 1 APPO row of the
chosen set; the ablation only changes ``algorithm.name``.
"""
from appo_jax.training.config import ExperimentConfig
from appo_jax.training.paper_hyperparameters import paper_config, select_row

BACKBONES = {"qwen2.5-7b": "Qwen2.5-7B-Instruct", "llama3.1-8b": "Llama-3.1-8B-Instruct"}
#: row -> algorithm; the first four are the paper's Table 4 (PAPER_LABELS), the rest extra ablations
ABLATIONS = {"appo": "appo", "entropy_only": "appo_entropy_only", "no_future_kl": "appo_no_future_kl",
             "no_dual_group": "appo_no_dual_group", "omega_only": "appo_omega_only",
             "no_prefix_credit": "appo_no_prefix_credit", "no_procedure_scaling": "appo_no_procedure_scaling"}
#: the paper's row labels -> ablation
PAPER_LABELS = {"APPO": "appo", "BS->Entropy": "entropy_only", "w/o future-value advantage scaling": "no_future_kl",
                "w/o dual-group": "no_dual_group"}
ROWS = tuple(f"{b},{a}" for b in BACKBONES for a in ABLATIONS)
QA_BENCHMARKS = "webwalker,hotpotqa,2wiki,musique,bamboogle"


def get_config(arg: str = "qwen2.5-7b,appo") -> ExperimentConfig:
    row, hp_set = select_row(arg, ROWS, "table4_ablations")
    backbone, ablation = row.split(",")
    c = paper_config("reasoning", hp_set, model=BACKBONES[backbone], algorithm=ABLATIONS[ablation],
                     name=f"table4-{backbone}-{ablation}", workdir=f"runs/table4/{backbone}-{ablation}")
    c.logging.eval_benchmarks = QA_BENCHMARKS
    return c
