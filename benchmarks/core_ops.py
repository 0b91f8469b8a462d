"""Speed of the APPO core: the O(L) pipeline vs a straightforward L x L decay-matrix Omega.

For B = 128 initial rollouts (16 prompt groups x n_init 8) and L in {2048, 8192, 32768} it times, compiled
(compile excluded, ``block_until_ready``, median of several runs):

* ``ours``: the full core pipeline in one jitted function -- candidate mask, future values Omega (O(L) reverse
  scan), Branching Scores, per-group selection of B = 8 branch points, then APPO advantages and the
  future-KL policy loss (with the k3 KL term) over the 256-row batch of the 128 initial rollouts plus their
  128 branch rollouts (parents / positions from the selection; the branch tokens are random stand-ins for
  what the sampler would produce);
* ``quadratic`` (the headline baseline): the official code's structure -- every rollout builds its own L x L
  decay matrix ``M[t, k] = gamma^(k - t) [k >= t]`` and multiplies it with its D (``lax.map`` over rows; timed
  on ``--per-rollout-rows`` rows and scaled linearly to all rows; up to 8192);
* ``quadratic_shared``: Omega alone with ONE L x L decay matrix shared by all rows, ``F = D @ M^T`` -- the most
  favourable form of the quadratic method (one dense matmul). At 32768 the matrix would be 4 GiB in float32, so
  it is built and multiplied in row blocks of 2048 (``--quadratic-32k skip`` skips it);
* ``ours_omega_only``: :func:`future_values` alone (the like-for-like comparison with ``quadratic_shared``);
* at ``--stages-at`` (8192) each stage of ``ours`` jitted alone, to show where the time goes.

Wall-clock medians are the headline; the median process CPU time is reported next to them because on a shared
host wall time also counts waiting for cores. Progress goes to stdout; the last line is one JSON object with
``speedup_vs_quadratic_at_8192``, per-length times (ms), the growth of our time with L, the stage breakdown,
the device and the JAX version. Run: ``python benchmarks/core_ops.py`` (about 2 minutes on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from appo_jax.core.advantages import appo_advantages
from appo_jax.core.branching import branching_scores, future_values, select_branch_points
from appo_jax.core.candidates import candidate_mask
from appo_jax.core.losses import policy_loss

VOCAB = 49152  # SmolLM2 vocabulary size; the candidate table is random here (the lookup cost is what matters)
QUADRATIC_BLOCK = 2048


def log(msg: str) -> None:
    print(msg, flush=True)


def make_inputs(rng, num_groups: int, n_init: int, budget: int, length: int):
    n, nb = num_groups * n_init, num_groups * budget
    rows = n + nb
    gen = rng.random((rows, length)) < 0.85
    cut = rng.integers(length // 4, length + 1, rows)  # ragged response lengths
    gen &= np.arange(length)[None, :] < cut[:, None]
    logp = -np.abs(rng.standard_normal((rows, length))).astype(np.float32)
    return dict(
        tokens=rng.integers(0, VOCAB, (n, length)).astype(np.int32),
        gen=gen,
        entropy=(rng.random((n, length)) * 3).astype(np.float32),
        logp=logp,
        old_logp=(logp + 0.05 * rng.standard_normal((rows, length))).astype(np.float32),
        ref_logp=(logp + 0.1 * rng.standard_normal((rows, length))).astype(np.float32),
        rewards=rng.random(rows).astype(np.float32),
        group_ids=np.repeat(np.arange(num_groups), n_init).astype(np.int32),
    ), rng.random(VOCAB) < 0.95


def batch_rows(group_ids, rows, pos, valid, num_groups: int, budget: int):
    """Per-row fields of the 256-row batch: the initial rollouts, then the [G, B] selected branch rows
    (group-major). Returns (group_ids, is_branch, parent, branch_pos, row_valid)."""
    n = group_ids.shape[0]
    minus_one = jnp.full((n,), -1, jnp.int32)
    group_all = jnp.concatenate([group_ids, jnp.repeat(jnp.arange(num_groups, dtype=jnp.int32), budget)])
    is_branch = jnp.arange(group_all.shape[0]) >= n
    parent = jnp.concatenate([minus_one, rows.reshape(-1)])
    branch_pos = jnp.concatenate([minus_one, pos.reshape(-1)])
    row_valid = jnp.concatenate([jnp.ones((n,), bool), valid.reshape(-1)])
    return group_all, is_branch, parent, branch_pos, row_valid


def make_pipeline(num_groups: int, n_init: int, budget: int, gamma: float):
    n = num_groups * n_init

    @jax.jit
    def pipeline(x, table):
        length = x["gen"].shape[1]
        gen_init = x["gen"][:n]
        cand = candidate_mask(x["tokens"], gen_init, table, length)
        omega = future_values(x["logp"][:n] - x["old_logp"][:n], gen_init, gamma, 0.2)
        scores, strict = branching_scores(x["entropy"], omega, cand)
        rows, pos, _, valid = select_branch_points(scores, strict, cand, x["group_ids"], num_groups, budget)
        group_all, is_branch, parent, branch_pos, row_valid = batch_rows(x["group_ids"], rows, pos, valid,
                                                                         num_groups, budget)
        adv = appo_advantages(x["rewards"], group_all, is_branch, parent, branch_pos, x["gen"], num_groups,
                              valid=row_valid)
        loss_mask = x["gen"] & ~is_branch[:, None]
        loss, metrics = policy_loss(x["logp"], x["old_logp"], adv, loss_mask, mode="future_kl",
                                    ref_logp=x["ref_logp"], kl_coef=0.001)
        return loss, metrics, omega, rows, pos

    return pipeline


def stage_timings(x, table, num_groups: int, n_init: int, budget: int, gamma: float, repeats: int) -> dict:
    """Median wall / CPU ms of each pipeline stage jitted on its own (inputs precomputed): where time goes."""
    n = num_groups * n_init
    length = x["gen"].shape[1]
    gen_init = x["gen"][:n]
    cand = candidate_mask(x["tokens"], gen_init, table, length)
    omega = jax.jit(future_values)(x["logp"][:n] - x["old_logp"][:n], gen_init, gamma, 0.2)
    scores, strict = jax.jit(branching_scores)(x["entropy"], omega, cand)
    rows, pos, _, valid = select_branch_points(scores, strict, cand, x["group_ids"], num_groups, budget)
    group_all, is_branch, parent, branch_pos, row_valid = batch_rows(x["group_ids"], rows, pos, valid,
                                                                     num_groups, budget)
    adv = appo_advantages(x["rewards"], group_all, is_branch, parent, branch_pos, x["gen"], num_groups,
                          valid=row_valid)
    stages = {
        "candidate_mask": (lambda t, g: candidate_mask(t, g, table, length), (x["tokens"], gen_init)),
        "future_values": (lambda a, b, m: future_values(a - b, m, gamma, 0.2),
                          (x["logp"][:n], x["old_logp"][:n], gen_init)),
        "branching_scores": (branching_scores, (x["entropy"], omega, cand)),
        "select_branch_points": (lambda s, st, c, g: select_branch_points(s, st, c, g, num_groups, budget),
                                 (scores, strict, cand, x["group_ids"])),
        "appo_advantages": (lambda *a: appo_advantages(*a, num_groups, valid=row_valid),
                            (x["rewards"], group_all, is_branch, parent, branch_pos, x["gen"])),
        "policy_loss_future_kl": (lambda lp, old, a, m, ref: policy_loss(lp, old, a, m, mode="future_kl",
                                                                         ref_logp=ref, kl_coef=0.001),
                                  (x["logp"], x["old_logp"], adv, x["gen"] & ~is_branch[:, None], x["ref_logp"])),
        # the same loss with its metrics dict dropped (jit removes their reductions): the cost of the loss proper
        "policy_loss_future_kl_value_only": (
            lambda lp, old, a, m, ref: policy_loss(lp, old, a, m, mode="future_kl", ref_logp=ref, kl_coef=0.001)[0],
            (x["logp"], x["old_logp"], adv, x["gen"] & ~is_branch[:, None], x["ref_logp"])),
    }
    out = {}
    for name, (fn, fn_args) in stages.items():
        _, wall, cpu = time_fn(jax.jit(fn), fn_args, repeats)
        out[name] = {"wall_ms": round(wall * 1e3, 3), "cpu_ms": round(cpu * 1e3, 3)}
    return out


def make_quadratic(gamma: float, eps: float = 0.2):
    def finish(f):
        return jnp.clip(jnp.exp(jnp.clip(f, -20.0, 20.0)), 1.0 - eps, 1.0 + eps)

    @jax.jit
    def full(log_ratio, mask):
        length = log_ratio.shape[-1]
        d = jnp.where(mask, log_ratio, 0.0)
        t = jnp.arange(length)
        diff = t[None, :] - t[:, None]  # k - t
        decay = jnp.where(diff >= 0, jnp.float32(gamma) ** diff.astype(jnp.float32), 0.0)
        return finish(d @ decay.T)

    @jax.jit
    def blocked(log_ratio, mask):
        length = log_ratio.shape[-1]
        d = jnp.where(mask, log_ratio, 0.0)
        k = jnp.arange(length)

        def block(start):
            t = start + jnp.arange(QUADRATIC_BLOCK)
            diff = k[None, :] - t[:, None]
            decay = jnp.where(diff >= 0, jnp.float32(gamma) ** diff.astype(jnp.float32), 0.0)  # [block, L]
            return d @ decay.T  # [N, block]

        f = jax.lax.map(block, jnp.arange(0, length, QUADRATIC_BLOCK))  # [L / block, N, block]
        return finish(jnp.transpose(f, (1, 0, 2)).reshape(d.shape))

    return full, blocked


def make_quadratic_per_rollout(eps: float = 0.2):
    """The official code's structure: each rollout builds its own L x L decay matrix and multiplies it with its
    D (``lax.map`` over rows; batching it with ``vmap`` would need B x L x L memory). ``gamma`` is traced, as a
    config value would be, so XLA cannot constant-fold the matrix."""

    @jax.jit
    def per_rollout(log_ratio, mask, gamma):
        length = log_ratio.shape[-1]
        t = jnp.arange(length)
        diff = t[None, :] - t[:, None]  # k - t

        def row(d_row):
            decay = jnp.where(diff >= 0, gamma ** diff.astype(jnp.float32), 0.0)
            return decay @ d_row

        f = jax.lax.map(row, jnp.where(mask, log_ratio, 0.0))
        return jnp.clip(jnp.exp(jnp.clip(f, -20.0, 20.0)), 1.0 - eps, 1.0 + eps)

    return per_rollout


def time_fn(fn, args, repeats: int) -> tuple[float, float, float]:
    """(compile + first run s, median wall-clock s, median process CPU s) over ``repeats`` further runs.

    CPU time (all threads of this process) is reported next to wall time because on a shared host the wall
    time also counts waiting for cores that other processes hold.
    """
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return first, statistics.median(wall), statistics.median(cpu)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--n-init", type=int, default=8)
    p.add_argument("--budget", type=int, default=8)
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=7, help="timed runs of our pipeline per length")
    p.add_argument("--quadratic-repeats", type=int, default=3)
    p.add_argument("--stages-at", type=int, default=8192,
                   help="also time each pipeline stage on its own at this length (0: never)")
    p.add_argument("--quadratic-32k", choices=["blocked", "skip"], default="blocked",
                   help="lengths above 8192: run the quadratic Omega in row blocks, or skip it")
    p.add_argument("--per-rollout-rows", type=int, default=8,
                   help="rows the per-rollout quadratic baseline is timed on (its time is linear in rows: "
                        "reported scaled to all rows); 0 skips it")
    p.add_argument("--per-rollout-max-len", type=int, default=8192)
    args = p.parse_args(argv)
    if any(length % QUADRATIC_BLOCK for length in args.lengths if length > 8192):
        p.error(f"--lengths above 8192 must be multiples of {QUADRATIC_BLOCK}")

    rng = np.random.default_rng(0)
    n = args.groups * args.n_init
    pipeline = make_pipeline(args.groups, args.n_init, args.budget, args.gamma)
    omega_only = jax.jit(lambda log_ratio, mask: future_values(log_ratio, mask, args.gamma, 0.2))
    quad_full, quad_blocked = make_quadratic(args.gamma)
    per_rollout = make_quadratic_per_rollout()
    device = jax.devices()[0]
    log(f"device={device.device_kind} ({device.platform}) x{jax.device_count()} jax={jax.__version__} "
        f"rows={n} initial + {args.groups * args.budget} branch")
    wall = {"ours": {}, "ours_omega_only": {}, "quadratic_shared_omega": {}, "quadratic_omega": {}}
    cpu = {key: {} for key in wall}
    notes, max_diff, stages = {}, {}, {}

    def record(key, length, fn, fn_args, repeats):
        first, med, med_cpu = time_fn(fn, fn_args, repeats)
        wall[key][length], cpu[key][length] = med * 1e3, med_cpu * 1e3
        log(f"L={length:6d} {key:16s} {med * 1e3:10.2f} ms wall, {med_cpu * 1e3:10.2f} ms cpu "
            f"(compile+first {first:.1f} s)")

    for length in args.lengths:
        inputs, table = make_inputs(rng, args.groups, args.n_init, args.budget, length)
        x = jax.device_put(inputs)
        table = jax.device_put(table)
        log_ratio, mask = x["logp"][:n] - x["old_logp"][:n], x["gen"][:n]
        record("ours", length, pipeline, (x, table), args.repeats)
        record("ours_omega_only", length, omega_only, (log_ratio, mask), args.repeats)
        if args.per_rollout_rows and length <= args.per_rollout_max_len:
            k = args.per_rollout_rows
            sub = (log_ratio[:k], mask[:k], jnp.float32(args.gamma))
            record("quadratic_omega", length, per_rollout, sub, args.quadratic_repeats)
            wall["quadratic_omega"][length] *= n / k
            cpu["quadratic_omega"][length] *= n / k
            diff = float(jnp.max(jnp.abs(per_rollout(*sub) - omega_only(log_ratio, mask)[:k])))
            log(f"L={length:6d} per-rollout quadratic scaled to {n} rows: "
                f"{wall['quadratic_omega'][length]:.1f} ms (max |diff| {diff:.1e})")
        if length == args.stages_at:
            stages = stage_timings(x, table, args.groups, args.n_init, args.budget, args.gamma, args.repeats)
            log(f"L={length:6d} stages (each jitted alone): {json.dumps(stages)}")
        if length <= 8192:
            quad, notes[length] = quad_full, "full L x L matrix built per call"
        elif args.quadratic_32k == "blocked":
            quad = quad_blocked
            notes[length] = f"matrix built and multiplied in row blocks of {QUADRATIC_BLOCK} (whole: 4 GiB at 32768)"
        else:
            notes[length] = "skipped: the L x L float32 decay matrix alone is 4 GiB at 32768"
            log(f"L={length:6d} shared-matrix quadratic skipped")
            continue
        record("quadratic_shared_omega", length, quad, (log_ratio, mask), args.quadratic_repeats)
        max_diff[length] = float(jnp.max(jnp.abs(quad(log_ratio, mask) - omega_only(log_ratio, mask))))
        log(f"L={length:6d} max |Omega_ours - Omega_shared_quadratic| = {max_diff[length]:.2e}; speedup of the whole "
            f"pipeline vs the shared matrix {wall['quadratic_shared_omega'][length] / wall['ours'][length]:.1f}x, "
            f"of Omega alone "
            f"{wall['quadratic_shared_omega'][length] / wall['ours_omega_only'][length]:.1f}x")

    by_len = lambda d: {str(k): round(v, 3) for k, v in d.items()}  # noqa: E731
    quad_ms = wall["quadratic_shared_omega"]
    speedup = lambda key: {str(k): round(quad_ms[k] / wall[key][k], 2) for k in wall[key] if k in quad_ms}  # noqa
    per_ms = wall["quadratic_omega"]
    per_speedup = {str(k): round(per_ms[k] / wall["ours"][k], 2) for k in per_ms}
    lengths = sorted(wall["ours"])
    result = {
        "benchmark": "core_ops",
        "rows_initial": n,
        "rows_branch": args.groups * args.budget,
        "groups": args.groups,
        "n_init": args.n_init,
        "budget": args.budget,
        "gamma": args.gamma,
        "speedup_vs_quadratic_at_8192": per_speedup.get("8192"),
        "speedup_vs_shared_matrix_quadratic_at_8192": speedup("ours").get("8192"),
        "omega_only_speedup_vs_shared_matrix_quadratic_at_8192": speedup("ours_omega_only").get("8192"),
        "ours_ms": by_len(wall["ours"]),
        "quadratic_ms": by_len(per_ms),
        "speedup_vs_quadratic": per_speedup,
        "quadratic_shared_matrix_ms": by_len(quad_ms),
        "speedup_vs_shared_matrix_quadratic": speedup("ours"),
        "ours_omega_only_ms": by_len(wall["ours_omega_only"]),
        "omega_only_speedup_vs_shared_matrix_quadratic": speedup("ours_omega_only"),
        "ours_growth_with_L": {f"{a}->{b}": {"time_ratio": round(wall["ours"][b] / wall["ours"][a], 2),
                                             "length_ratio": b / a} for a, b in zip(lengths, lengths[1:])},
        "process_cpu_ms": {key: by_len(v) for key, v in cpu.items()},
        f"ours_stages_ms_at_{args.stages_at}": stages,
        "quadratic_notes": {str(k): v for k, v in notes.items()},
        "omega_max_abs_diff_vs_shared_matrix_quadratic": {str(k): v for k, v in max_diff.items()},
        "ours_includes": "candidate mask + future values + branching scores + selection + APPO advantages + "
                         "future-KL policy loss with its metrics and k3 KL (256-row batch)",
        "quadratic_includes": f"Omega only, one L x L decay matrix per rollout (the official structure), "
                              f"timed on {args.per_rollout_rows} rows and scaled to {n}",
        "quadratic_shared_matrix_includes": "Omega only (decay matrix + matmul + clip), 128 rows, one shared matrix",
        "repeats": {"ours": args.repeats, "quadratic": args.quadratic_repeats},
        "device": f"{device.device_kind} ({device.platform}) x{jax.device_count()}",
        "host_cpus": os.cpu_count(),
        "host_load_avg_1min": round(os.getloadavg()[0], 2),
        "jax_version": jax.__version__,
        "python": platform.python_version(),
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
