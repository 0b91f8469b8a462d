"""Table 3 of the APPO paper: the rollout budget -- N initial rollouts, B branches per rollout, L levels, M total
rollouts per prompt -- of APPO on Qwen2.5-7B-Instruct, scored on the knowledge-QA benchmarks (docs/paper_configs.md).

    appo-jax train --config experiments/paper/table3_budgets.py:N2_B3             # the paper's set
    appo-jax train --config experiments/paper/table3_budgets.py:N2_B3,official    # the official scripts'

Rows (the table's labels in brackets): ``ARPO_M16`` (ARPO, M = 16), ``N2_B1`` (M=4 N2B1), ``N1_B3`` (M=4 N1B3),
``N2_B3`` (M=8 N2B3), ``N4_B3`` (M=16 N4B3, the paper's APPO setting), ``N8_B1`` (M=16 N8B1), ``N2_B7`` (M=16
N2B7), and the appendix's multi-level rows ``N1_B2_L3`` (M=15), ``N1_B4_L2`` (M=21), ``N3_B1_L2`` (M=9);
``N4_B2_L2`` (M=28) is not in the paper: two levels at the Table 3 APPO setting's N, for trying the scheme. A row
sets ``algorithm.n_init = N``, ``algorithm.levels = L`` and ``algorithm.n = N (1 + B + ... + B^L)``; the paper's
set selects B branches per rollout (``branch_selection = per_rollout``), the official set the top N*B of the
prompt group (``per_group``, the official code) where L = 1 (more levels need ``per_rollout``). Everything else is
the Table 1 Qwen2.5-7B row of the chosen set (`appo_jax.training.paper_hyperparameters`, setup ``reasoning``).
"""
from appo_jax.training.config import ExperimentConfig
from appo_jax.training.paper_hyperparameters import paper_config, select_row

#: row -> (N, B, L); ARPO_M16 is ARPO with M = 16 rollouts per prompt
BUDGETS = {"N2_B1": (2, 1, 1), "N1_B3": (1, 3, 1), "N2_B3": (2, 3, 1), "N4_B3": (4, 3, 1), "N8_B1": (8, 1, 1),
           "N2_B7": (2, 7, 1), "N1_B2_L3": (1, 2, 3), "N1_B4_L2": (1, 4, 2), "N3_B1_L2": (3, 1, 2),
           "N4_B2_L2": (4, 2, 2)}
ROWS = ("ARPO_M16", *BUDGETS)
QA_BENCHMARKS = "webwalker,hotpotqa,2wiki,musique,bamboogle"


def get_config(arg: str = "N4_B3") -> ExperimentConfig:
    row, hp_set = select_row(arg, ROWS, "table3_budgets")
    name, workdir = f"table3-{row.lower()}", f"runs/table3/{row.lower()}"
    if row == "ARPO_M16":
        c = paper_config("reasoning", hp_set, model="Qwen2.5-7B-Instruct", algorithm="arpo", name=name,
                         workdir=workdir)
    else:
        c = paper_config("reasoning", hp_set, model="Qwen2.5-7B-Instruct", algorithm="appo", name=name,
                         workdir=workdir, budget=BUDGETS[row])
    c.logging.eval_benchmarks = QA_BENCHMARKS
    return c
