"""How well the official top-k entropy agrees with the exact one, on real rollouts (docs/official_differences.md
row 6): the same rollouts sampled three times with the same keys (the tokens are identical: the entropy mode only
changes what is recorded), recording H_t exactly, renormalised over the top k (``topk``) and as the official code
(``official_topk``: vLLM's top-k log-probs plus the sampled token, not renormalised).

    python experiments/fidelity/entropy_modes.py --model smollm2-135m-instruct --dataset gsm8k --prompts 8 --n 4 \\
        --out experiments/fidelity/entropy_modes.json

Prints one JSON line: per top-k mode, the Spearman rank correlation with the exact entropy over the generated
tokens, the mean absolute difference, and the overlap of the branch points each entropy selects (entropy-only
Branching Score, ``--budget`` per prompt, this project's parity; overlap = |chosen_exact & chosen_mode| /
budget, averaged over prompts), plus the same overlap for the official parity with the official entropy against
this project's default (parity and entropy both switched).
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from scipy.stats import spearmanr

from appo_jax.core.branch_points import choose_branch_points
from appo_jax.core.candidates import candidate_token_table
from appo_jax.data import encode_records, load_dataset
from appo_jax.models.loading import load_policy
from appo_jax.rollout.config import RolloutConfig
from appo_jax.rollout.engine import RolloutEngine, default_tools
from appo_jax.rollout.strategies import initial_rollouts

MODES = ("exact", "topk", "official_topk")


def _chosen(traj, entropy, table, groups, budget, parity):
    t = traj.replace(entropy=jnp.asarray(entropy))
    zeros = jnp.zeros(t.tokens.shape, jnp.float32)
    pts = jax.device_get(choose_branch_points(t, zeros, zeros, jnp.asarray(table), num_groups=groups,
                                              budget=budget, score="entropy", parity=parity))
    return [{(int(r), int(p)) for r, p, v in zip(pts.rows[g], pts.positions[g], pts.valid[g]) if v}
            for g in range(groups)]


def _overlap(a, b, budget) -> float:
    return float(np.mean([len(x & y) / budget for x, y in zip(a, b)]))


def _processor() -> str:
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        m = None
    return m.group(1).strip() if m else (platform.processor() or platform.machine())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dataset", default="gsm8k")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4, help="rollouts per prompt")
    ap.add_argument("--k", type=int, default=10, help="the top-k of the top-k modes (official: 10)")
    ap.add_argument("--budget", type=int, default=4, help="branch points per prompt for the overlap")
    ap.add_argument("--max-response-len", type=int, default=384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    config, params, tokenizer = load_policy(args.model)
    records = load_dataset(args.dataset, limit=args.prompts, seed=args.seed)
    prompts, _ = encode_records(records, tokenizer, max_prompt_len=1024)
    runs = {}
    for mode in MODES:
        cfg = RolloutConfig(max_prompt_len=1024, max_response_len=args.max_response_len, tool_call_limit=2,
                            temperature=1.0, decode_chunk=16, entropy=mode, entropy_k=args.k
                            ).fitted(prompts, len(prompts) * args.n)
        with default_tools(cfg) as tools:
            engine = RolloutEngine(config, params, tokenizer, tools, cfg)
            try:
                runs[mode] = initial_rollouts(engine, prompts, args.n, jax.random.key(args.seed)).traj
            finally:
                engine.close()
    exact = runs["exact"]
    gen = np.asarray(exact.gen_mask) & np.asarray(exact.row_valid)[:, None]
    for mode in MODES[1:]:
        if not np.array_equal(np.asarray(runs[mode].tokens), np.asarray(exact.tokens)):
            raise RuntimeError(f"the {mode} run sampled other tokens than the exact one (same keys)")
    h = {mode: np.asarray(runs[mode].entropy, np.float64) for mode in MODES}
    ours = candidate_token_table(tokenizer)[:config.vocab_size]
    official = candidate_token_table(tokenizer, "official")[:config.vocab_size]
    pad = config.vocab_size - ours.size
    if pad > 0:
        ours, official = (np.concatenate([x, np.zeros(pad, bool)]) for x in (ours, official))
    base = _chosen(exact, h["exact"], ours, len(prompts), args.budget, "appo_jax")
    out = {"model": args.model, "dataset": args.dataset, "prompts": len(prompts), "rollouts_per_prompt": args.n,
           "generated_tokens": int(gen.sum()), "k": args.k, "budget": args.budget,
           "processor": _processor()}
    for mode in MODES[1:]:
        rho = spearmanr(h["exact"][gen], h[mode][gen]).statistic
        out[mode] = {"spearman_vs_exact": round(float(rho), 4),
                     "mean_abs_diff_nats": round(float(np.abs(h["exact"] - h[mode])[gen].mean()), 4),
                     "branch_point_overlap": round(_overlap(base, _chosen(exact, h[mode], ours, len(prompts),
                                                                           args.budget, "appo_jax"), args.budget), 4)}
    official_points = _chosen(exact, h["official_topk"], official, len(prompts), args.budget, "official")
    out["official_parity_and_entropy_overlap"] = round(_overlap(base, official_points, args.budget), 4)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    line = json.dumps(out)
    print(line)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")


if __name__ == "__main__":
    main()
