"""The pilot analysis of the mini reproduction: where the decision tokens are, and which branch-point rule finds them.

    python experiments/mini/pilot.py --task arith_program --seed 1 --grid runs/mini/grid \\
        --out experiments/mini/pilot_arith_program.json

On the task's SFT policy (the grid's cached one; the grid's ``--set`` overrides from ``grid.json`` apply) after ``--rl-steps`` APPO iterations (so that the lagged policy
differs from the current one), ``--prompts`` training prompts x 4 initial rollouts are sampled, and:

(a) every decision token (docs/mini_reproduction.md) is located relative to the tool-call boundaries: its distance
    in tokens to the nearest observation edge, and the share within one token of one;
(b) for each rule — the Branching Score with the lagged / sampler / reference Omega baselines, entropy only, Omega
    only (lagged), ARPO's rule (right after a tool result), uniformly random generated positions, and the oracle —
    4 branch points per prompt are chosen and reported: the share that hit a decision token (a branch at t
    resamples t + 1; a hit is a decision token at t, t + 1 or t + 2), and the outcome variance of ``--k``
    continuations re-sampled from each chosen point (the mean over points of the variance of their 0/1
    accuracy, and the share of points whose continuations disagree). The standard deviation of Omega under each
    baseline shows whether the Branching Score can use it at all.
``--real``: the same question on a model a user can run (the paper's Figure 1): SmolLM2-135M-Instruct on the
integer-arithmetic questions of experiments/demo_smollm2.py with the python tool, after that config's brief SFT
and ``--rl-steps`` APPO iterations (decode in the CPU kernels). Its tokens carry no decision labels, so a chosen
point counts as decisive when its ``--k`` continuations disagree in outcome (``outcome_changes``); the oracle
rule is left out. Each rule's decisive share comes with a 95% interval (bootstrap over prompts: the points of one
prompt are not independent), and each rule's difference to the Branching Score with the lagged baseline with a
paired one (`paired_diff_ci`: every rule chooses its points in the same rollouts of the same prompts, so a prompt's
difficulty cancels in the difference); the per-prompt counts are kept for other analyses.

Prints and writes one JSON object.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

HERE = Path(__file__).resolve().parent


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(task: str, seed: int, grid: Path, real: bool):
    from appo_jax.training.config import apply_overrides

    if real:  # SmolLM2 on the demo's arithmetic questions with the python tool, its brief SFT
        module = _module("demo_smollm2", HERE.parent / "demo_smollm2.py")
        return apply_overrides(module.get_config(), [f"train.seed={seed}", f"data.seed={seed}", "logging.eval_every=0",
                                                     "logging.progress=false", "rollout.cpu_kernels=true",
                                                     "checkpoint.every=0", "logging.dump_rollouts_every=0"])
    module = _module("mini_run_grid", HERE / "run_grid.py")._load_config_module()
    marker = grid / "grid.json"  # the grid's own overrides, so that its cached SFT policy is the one reused
    overrides = json.loads(marker.read_text()).get("overrides", []) if marker.is_file() else []
    return apply_overrides(module.get_config(f"appo,{task},{seed}"),
                           [*overrides, f"sft.cache_dir={grid / 'sft'}", "logging.eval_every=0",
                            "logging.progress=false"])


def share_ci(changes: np.ndarray, ok: np.ndarray, draws: int = 2000, seed: int = 0) -> list[float] | None:
    """95% interval of the share of valid points whose continuations disagree (``changes``, ``ok``: bool
    [prompts, points]): percentiles of the share over ``draws`` resamples of the prompts with replacement."""
    if not ok.any():
        return None
    rng = np.random.default_rng(seed)
    shares = []
    for _ in range(draws):
        pick = rng.integers(0, ok.shape[0], ok.shape[0])
        if ok[pick].any():
            shares.append(changes[pick][ok[pick]].mean())
    return [float(np.percentile(shares, 2.5)), float(np.percentile(shares, 97.5))]


def paired_diff_ci(changes_a: np.ndarray, ok_a: np.ndarray, changes_b: np.ndarray, ok_b: np.ndarray,
                   draws: int = 2000, seed: int = 0) -> dict | None:
    """share(A) - share(B) of decisive points (``changes``, ``ok``: bool [prompts, points] per rule, the same
    prompts) and its 95% interval: percentiles over ``draws`` resamples of the prompts with replacement, both rules
    on the same resample (paired)."""
    if not (ok_a.any() and ok_b.any()):
        return None
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(draws):
        pick = rng.integers(0, ok_a.shape[0], ok_a.shape[0])
        if ok_a[pick].any() and ok_b[pick].any():
            diffs.append(changes_a[pick][ok_a[pick]].mean() - changes_b[pick][ok_b[pick]].mean())
    diff = float(changes_a[ok_a].mean() - changes_b[ok_b].mean())
    return {"diff": diff, "ci95": [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))]}


def _arpo_points(traj, groups: int, budget: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ARPO's rule: branch right after a tool result (t = the first generated token after an observation)."""
    gen, obs = np.asarray(traj.gen_mask), np.asarray(traj.obs_mask)
    group = np.asarray(traj.group_id)
    cands = {g: [] for g in range(groups)}
    for r in range(gen.shape[0]):
        after = np.flatnonzero(gen[r, 1:] & obs[r, :-1]) + 1
        cands[int(group[r])] += [(r, int(t)) for t in after if t + 1 < gen.shape[1] and gen[r, t + 1]]
    return _pick(cands, groups, budget, rng)


def _random_points(traj, groups: int, budget: int, rng):
    gen = np.asarray(traj.gen_mask)
    group = np.asarray(traj.group_id)
    cands = {g: [] for g in range(groups)}
    for r in range(gen.shape[0]):
        ts = np.flatnonzero(gen[r, :-1] & gen[r, 1:])
        cands[int(group[r])] += [(r, int(t)) for t in ts]
    return _pick(cands, groups, budget, rng)


def _pick(cands, groups, budget, rng):
    rows, pos = np.zeros((groups, budget), np.int32), np.zeros((groups, budget), np.int32)
    valid = np.zeros((groups, budget), bool)
    for g in range(groups):
        c = cands[g]
        if not c:
            continue
        idx = rng.choice(len(c), budget, replace=len(c) < budget)
        for j, i in enumerate(idx):
            rows[g, j], pos[g, j] = c[int(i)]
            valid[g, j] = True
    return rows, pos, valid


def _hits(decisions: np.ndarray, rows, pos, valid) -> float:
    length = decisions.shape[1]
    hit = [decisions[r, t:min(t + 3, length)].any() for r, t, v in zip(rows.ravel(), pos.ravel(), valid.ravel()) if v]
    return float(np.mean(hit)) if hit else float("nan")


def _boundary_distances(decisions: np.ndarray, traj) -> list[int]:
    """Per decision token: tokens to the nearest observation edge (first token after / last before a result)."""
    obs, gen = np.asarray(traj.obs_mask), np.asarray(traj.gen_mask)
    out = []
    for r in range(decisions.shape[0]):
        edges = list(np.flatnonzero(obs[r, :-1] & ~obs[r, 1:]) + 1) + list(np.flatnonzero(~obs[r, :-1] & obs[r, 1:]))
        if not edges:
            continue
        edges = np.asarray(edges)
        for t in np.flatnonzero(decisions[r] & gen[r]):
            out.append(int(np.abs(edges - t).min()))
    return out


def _candidate_shares(tokenizer, traj, decisions: np.ndarray) -> dict:
    """Per branch-candidate rule (`appo_jax.core.candidates.CANDIDATE_RULES`): the share of the labelled decision
    tokens whose token id is a candidate at all (a rule that excludes a decision token can never branch there)."""
    from appo_jax.core.candidates import CANDIDATE_RULES, candidate_token_table  # deferred: as main's imports

    tokens = np.asarray(traj.tokens)
    out = {}
    for rule in CANDIDATE_RULES:
        table = candidate_token_table(tokenizer, rule)
        out[rule] = float(table[tokens][decisions].mean()) if decisions.any() else None
    return out


def main(argv=None) -> None:
    from appo_jax.core.branch_points import choose_branch_points
    from appo_jax.rollout.decision_labels import DecisionLabeller
    from appo_jax.rollout.strategies import branch_rollouts, initial_rollouts
    from appo_jax.training.policies import copy_tree
    from appo_jax.training.trainer import Trainer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="arith_program")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--grid", type=Path, default=Path("runs/mini/grid"), help="its sft/ cache is reused")
    ap.add_argument("--rl-steps", type=int, default=2, help="APPO iterations first (0: the SFT policy as it is)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--k", type=int, default=4, help="continuations re-sampled per chosen point")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--real", action="store_true", help="SmolLM2-135M-Instruct on arithmetic with the python tool")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    cfg = _config(args.task, args.seed, args.grid, args.real)
    cfg.train.steps = max(args.rl_steps, 1)  # 0: the SFT policy itself (its lagged policy is the current one)
    cfg.algorithm.omega_baseline = "lagged"
    workdir = tempfile.mkdtemp(prefix=f"appo_pilot_{args.task}_{args.seed}_")  # the trainer's scratch, removed after
    trainer = Trainer(cfg, workdir=workdir, log=lambda s: None)
    try:
        trainer.run_sft()
        sft_params = copy_tree(trainer.state.params)  # the reference policy of the runs: the SFT result
        for _ in range(args.rl_steps):
            trainer.train_iteration()
        pol, engine, n_init, budget = trainer.policies, trainer.engine, 4, 4
        prompts = trainer.prompts.next(args.prompts)
        key = jax.random.PRNGKey(1000 + args.seed)
        init = initial_rollouts(engine, prompts, n_init, key)
        traj = init.traj
        gen = np.asarray(traj.gen_mask) & np.asarray(traj.row_valid)[:, None]
        decisions = (np.zeros(gen.shape, bool) if args.real  # no labels: decisive = continuations disagree
                     else DecisionLabeller(trainer.task, trainer.tokenizer)(traj, prompts))
        lc = np.asarray(pol.logprobs(trainer.state.params, traj))
        lagged = pol.lagged[0] if pol.lagged else trainer.state.params  # --rl-steps 0: no older policy yet
        baselines = {"lagged": np.asarray(pol.logprobs(lagged, traj)),
                     "sampler": np.asarray(traj.behavior_logp),
                     "reference": np.asarray(pol.logprobs(sft_params, traj))}
        omega_std = {}
        rules = {}
        table = trainer.strategy.context.table
        for name, lb in baselines.items():
            pts = choose_branch_points(trainer.placement.tree(traj), jnp.asarray(lc), jnp.asarray(lb), table,
                                       num_groups=len(prompts), budget=budget, score="appo")
            om = np.asarray(pts.omega)
            omega_std[name] = float(np.mean([om[r][gen[r]].std() for r in range(om.shape[0]) if gen[r].any()]))
            rules[f"branching_score_{name}"] = pts
        for score in ("entropy", "omega"):
            rules[f"{score}_only"] = choose_branch_points(
                traj, jnp.asarray(lc), jnp.asarray(baselines["lagged"]), table, num_groups=len(prompts),
                budget=budget, score=score)
        if not args.real:
            rules["oracle"] = choose_branch_points(traj, jnp.asarray(lc), jnp.asarray(lc), table,
                                                   num_groups=len(prompts), budget=budget, score="oracle",
                                                   decisions=jnp.asarray(decisions))
        rng = np.random.default_rng(args.seed)
        chosen = {name: (np.asarray(p.rows), np.asarray(p.positions), np.asarray(p.valid)) for name, p in rules.items()}
        chosen["arpo_after_tool_call"] = _arpo_points(traj, len(prompts), budget, rng)
        chosen["random"] = _random_points(traj, len(prompts), budget, rng)
        out_rules, outcomes = {}, {}
        for i, (name, (rows, pos, valid)) in enumerate(chosen.items()):
            rep = lambda x: np.repeat(x, args.k, axis=1)  # noqa: E731 - k continuations per point
            cont = branch_rollouts(engine, traj, prompts, rep(rows), rep(pos), np.zeros(rep(rows).shape, np.float32),
                                   rep(valid), jax.random.fold_in(key, i + 1))
            acc = np.asarray(cont.accuracy, np.float64).reshape(len(prompts), budget, args.k)
            ok, changes = valid.astype(bool), acc.min(2) != acc.max(2)
            outcomes[name] = (changes, ok)
            out_rules[name] = {"decision_hit_rate": None if args.real else _hits(decisions, rows, pos, valid),
                               "outcome_variance": float(acc.var(axis=2)[ok].mean()) if ok.any() else None,
                               "outcome_changes": float(changes[ok].mean()) if ok.any() else None,
                               "outcome_changes_ci95": share_ci(changes, ok, seed=args.seed),
                               "continuation_accuracy": float(acc.mean(2)[ok].mean()) if ok.any() else None,
                               "points": int(ok.sum()),
                               "per_prompt_points": ok.sum(1).tolist(),
                               "per_prompt_decisive": (changes & ok).sum(1).tolist()}
        ref = "branching_score_lagged"
        for name in out_rules:
            if name != ref:
                out_rules[name][f"minus_{ref}"] = paired_diff_ci(*outcomes[name], *outcomes[ref], seed=args.seed)
        dist = _boundary_distances(decisions, traj)
        decision_stats = None if args.real else {
            "share_of_generated": float(decisions[gen].mean()),
            "median_tokens_to_tool_boundary": float(np.median(dist)) if dist else None,
            "share_within_1_token_of_boundary": float(np.mean(np.asarray(dist) <= 1)) if dist else None,
            "count": int(decisions.sum())}
        result = {
            "task": f"{cfg.data.train} ({cfg.model.name})" if args.real else args.task, "real": args.real,
            "seed": args.seed, "rl_steps_before": args.rl_steps, "prompts": len(prompts),
            "initial_rollouts": int(np.asarray(traj.row_valid).sum()), "k": args.k,
            "initial_accuracy": float(np.mean(init.accuracy)), "decision_tokens": decision_stats,
            "decision_tokens_that_are_candidates": None if args.real else _candidate_shares(trainer.tokenizer, traj,
                                                                                             decisions),
            "omega_std_per_baseline": omega_std, "rules": out_rules,
            "seconds": round(time.perf_counter() - t0, 1),
            "command": "python experiments/mini/pilot.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    finally:
        trainer.close()
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
