"""RolloutEngine: Trajectory assembly, APPO branches from token prefixes, ARPO / AEPO / Tree-GRPO groups, rewards,
and one end-to-end run on the real jitted sampler with a tiny random model."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from appo_jax.core.trajectory import (FINISH_ANSWER, FINISH_LENGTH, FINISH_TOOL_LIMIT, KIND_BRANCH, KIND_INIT,
                                      Trajectory)
from appo_jax.rollout.arpo import ArpoConfig, arpo_rollouts, branch_probability
from appo_jax.data.records import Record
from appo_jax.rollout.engine import RolloutConfig, RolloutEngine, concat_batches, concat_trajectories, tree_ids
from appo_jax.rollout.strategies import branch_rollouts, initial_rollouts
from appo_jax.rollout.tree import expansion_counts, step_nodes, tree_rollouts
from appo_jax.tools.result import format_observation
from test_agent_loop import (ScriptedPolicy, cached_query, full_script, obs_runs, prompt_ids,  # noqa: F401
                             tok, tools)  # fixtures shared with the agent-loop tests


def prompt_record(ids, ground_truths) -> Record:
    """A QA record (reward arpo_f1) whose prompt is already tokenised."""
    return Record("q", "q", list(ground_truths), "test", "test", "qa", [], tuple(int(i) for i in ids))


def two_prompts(tok):
    a, b = prompt_ids(tok, "What is six times seven?"), prompt_ids(tok, "What is two plus three?")
    scripts = {a: full_script(),
               b: ["<think>add</think>\n<python>print(2+3)</python>", "\n<answer>\\boxed{5}</answer>"]}
    items = [prompt_record(a, ["42"]), prompt_record(b, ["5"])]
    return scripts, items


def engine_for(tok, tools, scripts, slots=2, **cfg):
    base = dict(max_prompt_len=32, max_response_len=320, tool_call_limit=3, num_slots=slots, decode_chunk=4)
    base.update(cfg)
    policy = ScriptedPolicy(tok, scripts, num_slots=slots)
    return RolloutEngine(None, None, tok, tools, RolloutConfig(**base), sampler=policy), policy


def assert_prefix_equal(traj: Trajectory, row: int, parent_traj: Trajectory, parent: int, end: int):
    for f in ("tokens", "gen_mask", "obs_mask", "behavior_logp", "entropy"):
        np.testing.assert_array_equal(getattr(traj, f)[row, :end], getattr(parent_traj, f)[parent, :end], f)
    np.testing.assert_array_equal(traj.prompt_tokens[row], parent_traj.prompt_tokens[parent])


def test_initial_batch_layout_and_rewards(tok, tools):
    scripts, items = two_prompts(tok)
    eng, _ = engine_for(tok, tools, scripts)
    batch = initial_rollouts(eng, items, 3, jax.random.key(0))
    t = batch.traj
    assert t.tokens.shape == (6, 320) and t.prompt_tokens.shape == (6, 32)
    assert t.group_id.tolist() == [0, 0, 0, 1, 1, 1] and (t.kind == KIND_INIT).all()
    assert (t.parent == -1).all() and (t.branch_pos == -1).all() and t.row_valid.all()
    assert batch.tree_id.tolist() == list(range(6))
    for r in range(6):
        g = r // 3
        p = list(items[g].prompt_ids)
        assert t.prompt_tokens[r, 32 - len(p):].tolist() == p and t.prompt_mask[r].sum() == len(p)
        n = int((t.gen_mask[r] | t.obs_mask[r]).sum())
        assert not (t.gen_mask[r] | t.obs_mask[r])[n:].any() and (t.tokens[r, n:] == eng.pad_id).all()
        assert tok.decode(t.tokens[r, :n].tolist()) == batch.texts[r]
        assert t.finish_reason[r] == FINISH_ANSWER
        assert t.tool_calls[r] == len(batch.tool_calls[r]) == (2 if g == 0 else 1)
    # ARPO reward: correct boxed answer; +0.1 when both tools were used (prompt 0 uses python and search)
    np.testing.assert_allclose(t.reward, [1.1, 1.1, 1.1, 1.0, 1.0, 1.0], atol=1e-6)
    assert batch.tool_calls[0][1].name == "search" and batch.tool_calls[0][1].input == cached_query()


def test_tool_limit_rollout_gets_format_penalty(tok, tools):
    scripts, items = two_prompts(tok)
    eng, _ = engine_for(tok, tools, scripts, tool_call_limit=1)
    t = initial_rollouts(eng, items[:1], 1, jax.random.key(0)).traj
    assert t.finish_reason[0] == FINISH_TOOL_LIMIT and t.tool_calls[0] == 1
    assert t.reward[0] == pytest.approx(-1.0)


def test_branches_continue_parent_prefix(tok, tools):
    scripts, items = two_prompts(tok)
    eng, policy = engine_for(tok, tools, scripts)
    parents = initial_rollouts(eng, items, 2, jax.random.key(0))
    pt = parents.traj
    runs0 = obs_runs(pt.obs_mask[0])
    (a0, b0), (a1, _) = runs0
    # (row, t): mid first segment / in the second segment (after one tool result) / the last token of a
    # completed tool call (the branch must run that call itself) / an invalid slot
    rows = np.array([[0, 1, 0], [2, 3, 2]])
    pos = np.array([[5, b0 + 3, a1 - 1], [4, 6, 0]])
    scores = np.array([[0.5, 0.4, 0.3], [0.2, 0.1, 0.0]], np.float32)
    valid = np.array([[True, True, True], [True, True, False]])
    batch = branch_rollouts(eng, pt, items, rows, pos, scores, valid, jax.random.key(1))
    t = batch.traj
    assert t.tokens.shape == (6, 320)
    assert t.row_valid.tolist() == [True] * 5 + [False] and t.group_id.tolist() == [0, 0, 0, 1, 1, -1]
    assert t.kind[:5].tolist() == [KIND_BRANCH] * 5
    assert t.parent[:5].tolist() == [0, 1, 0, 2, 3] and t.branch_pos[:5].tolist() == [5, b0 + 3, a1 - 1, 4, 6]
    np.testing.assert_allclose(t.branch_score[:5], [0.5, 0.4, 0.3, 0.2, 0.1])
    assert batch.tree_id.tolist() == [0, 1, 0, 2, 3, -1]
    for r in range(5):
        p, end = int(t.parent[r]), int(t.branch_pos[r]) + 1
        assert_prefix_equal(t, r, pt, p, end)
        # the scripted policy continues deterministically: the whole branch equals its parent
        assert_prefix_equal(t, r, pt, p, 320)
        assert t.finish_reason[r] == FINISH_ANSWER and t.reward[r] == pytest.approx(pt.reward[p])
        assert [(c.name, c.input, c.output) for c in batch.tool_calls[r]] == \
            [(c.name, c.input, c.output) for c in parents.tool_calls[p]]
    # the policy slots were started from prompt + parent prefix (one start per valid branch)
    starts = [e for e in policy.log if e[0] == "start"]
    assert len(starts) == 4 + 5
    assert not t.gen_mask[5].any() and not t.obs_mask[5].any() and t.parent[5] == -1
    # concat keeps parent pointers into the first batch
    both = concat_batches(parents, batch)
    assert both.traj.tokens.shape == (10, 320) and both.traj.parent[4:9].tolist() == [0, 1, 0, 2, 3]
    assert concat_trajectories(pt, t).kind.tolist() == [0] * 4 + [1] * 6
    assert len(both.texts) == 10 and both.tree_id[4:9].tolist() == [0, 1, 0, 2, 3]


def test_branch_tool_count_continues_from_parent(tok, tools):
    scripts, items = two_prompts(tok)
    eng, _ = engine_for(tok, tools, scripts, tool_call_limit=1)
    parents = initial_rollouts(eng, items[:1], 1, jax.random.key(0)).traj
    assert parents.finish_reason[0] == FINISH_TOOL_LIMIT
    (_, b0), = obs_runs(parents.obs_mask[0])
    t = branch_rollouts(eng, parents, items, np.array([[0, 0]]), np.array([[3, b0 + 2]]), np.zeros((1, 2)),
                     np.ones((1, 2), bool), jax.random.key(1)).traj
    # before the first call: the branch makes it (1 <= limit) and stops at the second; after it: count is 1
    assert t.finish_reason.tolist() == [FINISH_TOOL_LIMIT, FINISH_TOOL_LIMIT] and t.tool_calls.tolist() == [1, 1]
    np.testing.assert_array_equal(t.tokens, np.repeat(parents.tokens, 2, axis=0))


def test_branch_at_budget_edge_is_length(tok, tools):
    scripts, items = two_prompts(tok)
    eng, _ = engine_for(tok, tools, scripts, max_response_len=24)
    parents = initial_rollouts(eng, items[:1], 1, jax.random.key(0)).traj
    assert parents.finish_reason[0] == FINISH_LENGTH
    t = branch_rollouts(eng, parents, items, np.array([[0]]), np.array([[23]]), np.zeros((1, 1)), np.ones((1, 1), bool),
                     jax.random.key(1)).traj
    assert t.finish_reason[0] == FINISH_LENGTH and (t.tokens[0] == parents.tokens[0]).all()


def test_branch_probability_formula():
    cfg = ArpoConfig(alpha=0.5, beta=0.2, beam=2, penalty=0.05)
    assert branch_probability(0.3, 0.1, 0, cfg) == pytest.approx(0.5 + 0.2 * 0.2)
    assert branch_probability(0.3, 0.1, 3, cfg) == pytest.approx((0.5 + 0.2 * 0.2) * (1 - 0.15))
    assert branch_probability(9.0, 0.0, 0, ArpoConfig(penalty=0.0)) == 1.0
    assert branch_probability(-9.0, 0.0, 0, ArpoConfig()) == 0.0
    assert branch_probability(0.0, 0.0, 30, cfg) == 0.0


def check_group_tree(t: Trajectory, n: int, g: int):
    rows = range(g * n, (g + 1) * n)
    for r in rows:
        assert t.row_valid[r] and t.group_id[r] == g
        if t.kind[r] == KIND_BRANCH:
            p = int(t.parent[r])
            assert g * n <= p < r
            assert_prefix_equal(t, r, t, p, int(t.branch_pos[r]) + 1)


def test_arpo_always_branching_fills_groups_with_branches(tok, tools):
    scripts, items = two_prompts(tok)
    eng, _ = engine_for(tok, tools, scripts)
    batch = arpo_rollouts(eng, items, 4, 2, jax.random.key(0), ArpoConfig(alpha=1.0, beta=0.0))
    t = batch.traj
    assert t.tokens.shape == (8, 320)
    for g in range(2):
        check_group_tree(t, 4, g)
        assert t.kind[g * 4:g * 4 + 2].tolist() == [KIND_INIT] * 2
        assert t.kind[g * 4 + 2:g * 4 + 4].tolist() == [KIND_BRANCH] * 2
        for r in range(g * 4 + 2, g * 4 + 4):  # ARPO branches right after a tool result of the parent
            p, bp = int(t.parent[r]), int(t.branch_pos[r])
            assert t.obs_mask[p, bp] and not t.obs_mask[p, bp + 1]
    assert (batch.tree_id[t.kind == KIND_INIT] == np.flatnonzero(t.kind == KIND_INIT)).all()
    assert (t.reward > 0.9).all()


def test_arpo_never_branching_tops_up_with_fresh_rollouts(tok, tools):
    scripts, items = two_prompts(tok)
    eng, _ = engine_for(tok, tools, scripts)
    t = arpo_rollouts(eng, items, 3, 1, jax.random.key(0), ArpoConfig(alpha=0.0, beta=0.0, penalty=0.05)).traj
    assert t.row_valid.all() and (t.kind == KIND_INIT).all() and (t.parent == -1).all()
    assert t.group_id.tolist() == [0, 0, 0, 1, 1, 1]


def test_tree_grpo_expands_step_nodes(tok, tools):
    scripts, items = two_prompts(tok)
    eng, _ = engine_for(tok, tools, scripts)
    batch = tree_rollouts(eng, items, 5, 2, jax.random.key(0), rounds=2)
    t = batch.traj
    assert expansion_counts(5, 2) == [2, 1]
    for g in range(2):
        check_group_tree(t, 5, g)
        base = g * 5
        assert t.kind[base:base + 2].tolist() == [KIND_INIT] * 2 and (t.kind[base + 2:base + 5] == 1).all()
        for r in range(base + 2, base + 5):  # expansions start right after a complete tool step of the parent
            p, bp = int(t.parent[r]), int(t.branch_pos[r])
            assert bp in step_nodes(t.obs_mask[p], 320)
        roots = batch.tree_id[base:base + 5]
        assert sorted(set(roots.tolist())) == [base, base + 1]
        assert sorted(np.bincount(roots - base).tolist()) == [2, 3]
    np.testing.assert_array_equal(batch.tree_id, tree_ids(t.parent, t.row_valid))


def test_bad_input_is_reported(tok, tools):
    scripts, items = two_prompts(tok)
    eng, _ = engine_for(tok, tools, scripts, max_prompt_len=4)
    with pytest.raises(ValueError, match="max_prompt_len"):
        initial_rollouts(eng, items, 1, jax.random.key(0)).traj
    with pytest.raises(ValueError, match="max_response_len"):
        RolloutConfig(max_response_len=0)


# ---------------------------------------------------------------------------------------- real sampler, tiny
def test_real_sampler_end_to_end(tok, tools):
    """A tiny random model on the jitted sampler: behaviour log-probs equal a full forward's log-probs, also
    after a tool result appended to the cache (a branch whose prefix ends with a completed python call)."""
    from appo_jax.models.decoder import init_params
    from appo_jax.models.presets import get_config
    from appo_jax.models.logprobs import trajectory_logprobs

    config = dataclasses.replace(get_config("tiny-llama"), vocab_size=len(tok), eos_token_ids=(tok.eos_token_id,),
                                 pad_token_id=tok.pad_token_id)
    params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
    cfg = RolloutConfig(max_prompt_len=16, max_response_len=40, tool_call_limit=2, num_slots=2, decode_chunk=8)
    eng = RolloutEngine(config, params, tok, tools, cfg)
    # rollout.cpu_kernels is on by default: the decode steps run in the C++ kernels where they can, else XLA says why
    from appo_jax.kernels.build import kernel_status
    assert eng.sampler.cpu_kernels_status == kernel_status()
    assert ("decode steps in the CPU kernels" if kernel_status()[0] else "decode steps in XLA (") in eng.describe()
    off = RolloutEngine(config, params, tok, tools, dataclasses.replace(cfg, cpu_kernels=False))
    assert off.describe().endswith("decode steps in XLA (not asked for)")
    off.close()
    items = [prompt_record(prompt_ids(tok, "Compute two plus three."), ["5"])]
    parents = initial_rollouts(eng, items, 3, jax.random.key(1)).traj
    assert parents.row_valid.all() and parents.gen_mask.any(axis=1).all()
    # a parent whose response starts with a complete python call, branched right after the call
    call = tok.encode("<python>print(2+3)</python>", add_special_tokens=False)
    k = len(call)
    p2 = jax.tree_util.tree_map(np.copy, parents)
    p2.tokens[0, :k] = call
    p2.gen_mask[0, :] = False
    p2.gen_mask[0, :k] = True
    p2.obs_mask[0, :] = False
    t = branch_rollouts(eng, p2, items, np.array([[0]]), np.array([[k - 1]]), np.zeros((1, 1)), np.ones((1, 1), bool),
                     jax.random.key(2)).traj
    result = tok.encode(format_observation("5"), add_special_tokens=False)
    assert t.tool_calls[0] == 1 and t.tokens[0, k:k + len(result)].tolist() == result
    assert t.obs_mask[0, k:k + len(result)].all() and t.gen_mask[0, k + len(result):].any()
    logprobs = jax.jit(trajectory_logprobs, static_argnames=("config", "chunk"))
    for traj in (parents, t):
        lp, _ = logprobs(params, traj, config=config, chunk=16)
        m = traj.gen_mask & traj.row_valid[:, None]
        m[:, :k] &= traj.kind[:, None] == KIND_INIT  # the branch's copied prefix was not sampled here
        np.testing.assert_allclose(np.asarray(lp)[m], traj.behavior_logp[m], atol=2e-4)

    # the CLI's APPO path: recomputed log-probs (Omega ~ constant) -> branch points -> branches -> JSON records
    from appo_jax.core.candidates import candidate_token_table
    from appo_jax.rollout.commands import rollout_records
    from appo_jax.rollout.strategies import AppoBranching, AppoOptions, StrategyContext

    def current_and_sampler(policy_params, traj):
        return logprobs(policy_params, traj, config=config, chunk=16)[0], traj.behavior_logp

    table = candidate_token_table(tok)
    strategy = AppoBranching(AppoOptions(n=4, n_init=2), StrategyContext(table=table, logprobs=current_and_sampler))
    sampled = strategy.sample(eng, params, lambda k: items[:k], 1, jax.random.key(3))
    init = jax.tree_util.tree_map(lambda x: np.asarray(x)[:2], sampled.batch.traj)
    points = sampled.branching
    rows, pos, valid = (np.asarray(x) for x in (points.rows, points.positions, points.valid))
    assert valid.all() and sampled.train_rows == 2
    for r, p in zip(rows[0], pos[0]):
        assert init.gen_mask[r, p] and table[init.tokens[r, p]] and p + 1 < cfg.max_response_len
    both = sampled.batch
    recs = list(rollout_records(both, ["prompt text"], ["question"]))
    assert [r["kind"] for r in recs] == ["init", "init", "branch", "branch"]
    assert [r["parent"] for r in recs] == [-1, -1] + rows[0].tolist()
    for r in recs:
        n = len(r["token_ids"])
        assert len(r["generated_mask"]) == len(r["observation_mask"]) == len(r["logprobs"]) == n
        assert set(r) >= {"prompt", "text", "token_ids", "generated_mask", "observation_mask", "logprobs",
                          "entropies", "tool_calls", "reward", "kind", "parent", "branch_position",
                          "branch_score"}
    for r in recs[2:]:
        par = recs[r["parent"]]
        cut = r["branch_position"] + 1
        assert r["token_ids"][:cut] == par["token_ids"][:cut] and r["logprobs"][:cut] == par["logprobs"][:cut]

    # two levels, B = 1 per rollout (docs/algorithm.md §1.10): n = 2 (1 + 1 + 1); level 2 branches level 1's rows
    deep = AppoBranching(AppoOptions(n=6, n_init=2, levels=2, branch_selection="per_rollout"),
                         StrategyContext(table=table, logprobs=current_and_sampler))
    assert deep.rollouts_per_prompt == 2 and deep.options.branches == 1
    sampled = deep.sample(eng, params, lambda k: items[:k], 1, jax.random.key(4))
    recs = list(rollout_records(sampled.batch, ["prompt text"], ["question"]))
    assert [r["kind"] for r in recs] == ["init"] * 2 + ["branch"] * 4 and sampled.train_rows == 2
    assert sampled.metrics["branch/level1_count"] == 2 and sampled.metrics["branch/level2_count"] == 2
    assert [r["parent"] for r in recs[2:4]] == [0, 1]  # per rollout: one branch each
    assert {r["parent"] for r in recs[4:]} == {2, 3}  # level 2 hangs under level 1
    for r in recs[2:]:
        par = recs[r["parent"]]
        cut = r["branch_position"] + 1
        assert r["token_ids"][:cut] == par["token_ids"][:cut]
    assert set(np.asarray(sampled.batch.tree_id)[4:]) <= {0, 1}  # trees rooted at the initial rows
    with pytest.raises(ValueError, match="branch_selection=per_rollout"):
        AppoOptions(n=6, n_init=2, levels=2)
    with pytest.raises(ValueError, match=r"B = 1, 2, 3, 4 give n = 6, 14, 26, 42"):
        AppoOptions(n=8, n_init=2, levels=2, branch_selection="per_rollout")


def test_branch_inside_stop_string_still_runs_the_tool(tok, tools):
    """A branch point inside ``</python>`` (the ``python`` token): the stop string straddles the prefix end, which
    the policy's own stop check (text since the slot's start) cannot see; the loop finds it, runs the tool, and
    the branch equals its parent."""
    scripts, items = two_prompts(tok)
    eng, policy = engine_for(tok, tools, scripts)
    parents = initial_rollouts(eng, items[:1], 1, jax.random.key(0)).traj
    a0 = obs_runs(parents.obs_mask[0])[0][0]
    close = tok.encode("</python>", add_special_tokens=False)
    assert parents.tokens[0, a0 - len(close):a0].tolist() == close
    for t in range(a0 - len(close), a0 - 1):  # prefix ends with "</" / "</python"
        policy.log.clear()
        b = branch_rollouts(eng, parents, items, np.array([[0]]), np.array([[t]]), np.zeros((1, 1)), np.ones((1, 1), bool),
                         jax.random.key(1)).traj
        assert b.finish_reason[0] == FINISH_ANSWER and b.tool_calls[0] == 2
        np.testing.assert_array_equal(b.tokens[0], parents.tokens[0])
        np.testing.assert_array_equal(b.obs_mask[0], parents.obs_mask[0])


class _Memoised:
    """A tool of ``registry`` whose result for each input is computed once (the real tool runs; thread-safe: two
    first calls with one input may both run it)."""

    def __init__(self, registry, name: str):
        self.name, self._registry, self._results = name, registry, {}

    def __call__(self, input_text: str):
        if input_text not in self._results:
            self._results[input_text] = self._registry.call(self.name, input_text)
        return self._results[input_text]


@pytest.fixture(scope="module")
def memoised_tools(tools):
    """`tools` with every result memoised on its input, for the tests that sample many strategies: their rollouts
    make the same few tool calls hundreds of times (each python call a sandbox process), and what they check is
    where the branches go and what the engine forks, not the tools (tests/test_tools_*.py check those)."""
    from appo_jax.tools.registry import ToolRegistry

    registry = ToolRegistry([_Memoised(tools, name) for name in tools.names], max_workers=4)
    yield registry
    registry.close()


def test_every_branching_knob_reaches_the_engine_from_the_experiment_config(tok, memoised_tools):
    """``--set algorithm.<knob>=...`` (and ``rollout.probe_len``) on an experiment config changes what the engine
    does, for every ARPO / AEPO / Tree-GRPO knob (the algorithm section's knobs reach the strategy's typed options,
    the rollout section is the engine's config, neither a copy that drops fields)."""
    from appo_jax.training.config import ExperimentConfig, algorithm_spec, apply_overrides

    scripts, items = two_prompts(tok)
    base = ["rollout.max_prompt_len=32", "rollout.max_response_len=320", "rollout.tool_call_limit=3",
            "rollout.num_slots=2", "rollout.decode_chunk=4", "algorithm.n=6", "algorithm.n_init=2"]

    def shape(batch):
        t = batch.traj
        return [(int(k), int(p), int(b)) for k, p, b in zip(t.kind, t.parent, t.branch_pos)]

    def sample(algorithm, sets):
        cfg = apply_overrides(ExperimentConfig(), base + [f"algorithm.name={algorithm}"] + list(sets))
        eng = RolloutEngine(None, None, tok, memoised_tools, cfg.rollout,
                            sampler=ScriptedPolicy(tok, scripts, num_slots=2))
        strategy = algorithm_spec(cfg).strategy(cfg.algorithm)
        return shape(strategy.sample(eng, None, lambda k: items[:k], 2, jax.random.key(0)).batch)

    def arpo(*sets, aepo=False):
        return sample("aepo" if aepo else "arpo", sets)

    def tree(*sets):
        return sample("tree_grpo", sets)

    steep = ("rollout.probe_len=1", "algorithm.arpo_alpha=0.5")  # one-token probes: the entropy change dH != 0
    assert arpo("algorithm.arpo_alpha=1.0", "algorithm.arpo_beta=0") != arpo("algorithm.arpo_alpha=0",
                                                                           "algorithm.arpo_beta=0")
    assert arpo(*steep, "algorithm.arpo_beta=0") != arpo(*steep, "algorithm.arpo_beta=50")
    assert arpo("rollout.probe_len=1", "algorithm.arpo_beta=50") != arpo("rollout.probe_len=20", "algorithm.arpo_beta=50")
    always = ("algorithm.arpo_alpha=1.0", "algorithm.arpo_beta=0")
    assert arpo(*always, "algorithm.arpo_beam=2") != arpo(*always, "algorithm.arpo_beam=3")
    assert (arpo(*always, "algorithm.aepo_penalty=0", aepo=True)
            != arpo(*always, "algorithm.aepo_penalty=1.0", aepo=True))
    assert tree("algorithm.tree_rounds=1") != tree("algorithm.tree_rounds=3")


def run_as_processes(monkeypatch, procs: int, work) -> list:
    """``[work(0), ..., work(procs - 1)]``, each on its own thread standing in for a process of a multi-host job:
    `appo_jax.rollout.host_sharded`'s gathers become an in-memory all-gather between the threads; an exception
    on one thread breaks the other's barrier and is raised here, with the thread's own."""
    import threading

    from appo_jax.rollout import host_sharded

    where, box, got = threading.local(), {}, {}
    barrier = threading.Barrier(procs, timeout=120)

    def all_gather(obj):
        box[where.index] = obj
        barrier.wait()
        out = [box[p] for p in range(procs)]
        barrier.wait()
        return out

    monkeypatch.setattr(host_sharded, "gather_objects", all_gather)
    monkeypatch.setattr(host_sharded, "gather_rows", lambda tree: jax.tree.map(
        lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *all_gather(tree)))

    def process(p):
        where.index = p
        try:
            got[p] = work(p)
        except BaseException as exc:  # noqa: BLE001 - reported below, with the process
            got[p] = exc
            barrier.abort()

    threads = [threading.Thread(target=process, args=(p,), daemon=True) for p in range(procs)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=240)
    for p in range(procs):
        if isinstance(got.get(p), BaseException):
            raise got[p]
    return [got[p] for p in range(procs)]


def test_the_host_sharded_primitive_gives_every_strategy_the_one_process_batch(tok, memoised_tools, monkeypatch):
    """`HostShardedEngine` shards the engine's one primitive: two processes (threads here, with an in-memory
    all-gather) each run the requests of their block of groups, and every strategy (a single call: independent,
    ARPO / AEPO with in-loop copies; several calls with decisions between them: Tree-GRPO's rounds) ends with the
    batch one process builds, on both processes: rows, group ids, kinds, texts, tokens and, where no decision
    depends on the loop's timing, parent rows, branch positions and tree ids (which rollout of an ARPO group is
    copied follows the order its rollouts reach their tool results, on one process as on several: there each
    group is checked to be a valid tree of its own rows)."""
    from appo_jax.rollout.host_sharded import HostShardedEngine
    from appo_jax.rollout.strategies import make_strategy

    scripts, items = two_prompts(tok)

    def sample(name, options, engine):
        batch = make_strategy(name, options).sample(engine, None, lambda k: items[:k], 2, jax.random.key(7)).batch
        t = batch.traj
        out = (t.row_valid.tolist(), t.group_id.tolist(), t.kind.tolist(), batch.texts, t.tokens.tolist())
        if name in ("arpo", "aepo"):
            for g in range(2):
                check_group_tree(t, options["n"], g)
            return out
        return out + (t.parent.tolist(), t.branch_pos.tolist(), batch.tree_id.tolist())

    for name, options in (("independent", {"n": 3}), ("arpo", {"n": 4, "n_init": 2, "arpo_alpha": 1.0}),
                          ("aepo", {"n": 4, "n_init": 1, "arpo_alpha": 1.0, "aepo_penalty": 0.3}),
                          ("tree", {"n": 5, "n_init": 2, "tree_rounds": 2})):
        want = sample(name, options, engine_for(tok, memoised_tools, scripts)[0])
        got = run_as_processes(monkeypatch, 2, lambda p, name=name, options=options: sample(
            name, options, HostShardedEngine(engine_for(tok, memoised_tools, scripts)[0], p, 2, lambda x: x, None)))
        assert got[0] == want and got[1] == want, name


def tiny_forking_policy(tok):
    """``(config, params, items, make_engine, context)`` of the KV-fork checks: a sharpened tiny model, two
    prompts, ``make_engine(kv_fork)`` whose every rollout starts with a python call (branches then start after a
    tool result) and the APPO strategy context."""
    from test_sampler import _sharp_params

    from appo_jax.core.candidates import candidate_token_table
    from appo_jax.models.logprobs import trajectory_logprobs
    from appo_jax.models.presets import get_config
    from appo_jax.rollout.agent_loop import Prefix
    from appo_jax.rollout.strategies import StrategyContext

    config = dataclasses.replace(get_config("tiny-llama"), vocab_size=len(tok), eos_token_ids=(tok.eos_token_id,),
                                 pad_token_id=tok.pad_token_id)
    params = _sharp_params(config, 3)
    logprobs = jax.jit(trajectory_logprobs, static_argnames=("config", "chunk"))

    def current_and_sampler(policy_params, traj):
        return logprobs(policy_params, traj, config=config, chunk=16)[0], traj.behavior_logp

    items = [prompt_record(prompt_ids(tok, q), ["5"]) for q in ("Compute two plus three.", "What is 7 minus 2?")]
    call = np.asarray(tok.encode("<python>print(2 + 3)</python>", add_special_tokens=False), np.int32)
    seed_call = Prefix(call, np.ones(call.size, bool), np.zeros(call.size, bool), np.zeros(call.size, np.float32),
                       np.zeros(call.size, np.float32))

    def make_engine(tools, kv_fork: bool) -> RolloutEngine:
        cfg = RolloutConfig(max_prompt_len=32, max_response_len=40, tool_call_limit=2, num_slots=4, decode_chunk=8,
                            temperature=0.0, top_k=0, kv_fork=kv_fork, probe_len=4)
        eng = RolloutEngine(config, params, tok, tools, cfg)
        plain_request = eng.request

        def request(key, item, group, local, *, prefix=None, **kw):
            return plain_request(key, item, group, local, prefix=seed_call if prefix is None else prefix, **kw)

        eng.request = request
        return eng

    return config, params, items, make_engine, StrategyContext(table=candidate_token_table(tok),
                                                               logprobs=current_and_sampler)


def test_every_branching_strategy_forked_from_the_parents_kv_equals_reprefilled(tok, memoised_tools):
    """``rollout.kv_fork`` for every branching strategy, each run once with and once without it on a tiny model
    (same keys, greedy): APPO at two levels (level 1 is one-level APPO's branch phase) and Tree-GRPO (two
    rounds) fork from the slots the previous phase left, AEPO (ARPO's loop with a penalty; ARPO's own in
    `test_host_sharded_forks_...`) forks its in-loop copies from the parent's running slot, and every rollout
    starts with a python call so that branches start after a tool result. With the fork the batch is the
    one re-prefilled branches give (tokens and masks equal, log-probs within 1e-5 + 1e-5 |log p|) and every
    branch was forked (``branch/kv_forked``); without it none was. Sampled forks are checked at the sampler level
    (`test_sampler.py::test_fork_from_a_snapshot_equals_a_reprefilled_start`): the KV a decode step wrote and
    the KV a prefill computes differ in the last float bits, which flips a draw landing within ~1e-6 of a
    boundary of the cumulative distribution (over this random model's flat 49k-token distributions, sampled
    two-level branches flipped one draw in 8 rows)."""
    from appo_jax.rollout.strategies import make_strategy

    _, params, items, make_engine, context = tiny_forking_policy(tok)
    # (name, options, branches forked with kv_fork): APPO 4 per group over its two levels (per_rollout; level 1
    # forks as a one-level APPO does), Tree-GRPO 3 expansions per group, AEPO one copy per group (alpha 1: every
    # tool result branches while the group has room)
    cases = [("appo", dict(n=6, n_init=2, levels=2, branch_selection="per_rollout"), 8),
             ("tree", dict(n=5, n_init=2, tree_rounds=2), 6),
             ("aepo", dict(n=2, n_init=1, arpo_alpha=1.0, aepo_penalty=0.3), 2)]
    out = {}
    for fork in (False, True):
        eng = make_engine(memoised_tools, fork)
        for i, (name, options, _) in enumerate(cases):
            out[fork, i] = make_strategy(name, options, context).sample(eng, params, lambda k: items[:k], 2,
                                                                        jax.random.key(11))
        eng.close()
    for i, (name, options, branches) in enumerate(cases):
        plain, forked = out[False, i], out[True, i]
        assert plain.metrics.get("branch/kv_forked", 0) == 0, (name, options)
        assert forked.metrics["branch/kv_forked"] == branches, (name, options)
        a, b = plain.batch.traj, forked.batch.traj
        assert int(np.asarray(a.tool_calls).sum()) > 0, (name, options)
        np.testing.assert_array_equal(a.tokens, b.tokens, err_msg=name)
        np.testing.assert_array_equal(a.gen_mask, b.gen_mask, err_msg=name)
        np.testing.assert_array_equal(a.parent, b.parent, err_msg=name)
        np.testing.assert_allclose(a.behavior_logp, b.behavior_logp, rtol=1e-5, atol=1e-5, err_msg=name)


def test_host_sharded_forks_use_each_process_own_slots(tok, memoised_tools, monkeypatch):
    """`HostShardedEngine` with ``rollout.kv_fork``: two processes (threads, in-memory all-gather), each with
    its own sampler, fork the branches of their own groups from their own slots (the gathered batch keeps each
    row's slot in the sampler that ran it) and end with the batch one process builds without forks, on both
    processes; every branch was forked (APPO at two levels from the slots its parents left, ARPO's in-loop copy
    from a running slot)."""
    from appo_jax.rollout.host_sharded import HostShardedEngine
    from appo_jax.rollout.strategies import make_strategy

    _, params, items, make_engine, context = tiny_forking_policy(tok)
    cases = [("appo", dict(n=6, n_init=2, levels=2, branch_selection="per_rollout"), 8),
             ("arpo", dict(n=2, n_init=1, arpo_alpha=1.0), 2)]

    def sample_all(engine):
        return [make_strategy(name, options, context).sample(engine, params, lambda k: items[:k], 2,
                                                             jax.random.key(11)) for name, options, _ in cases]

    want = sample_all(make_engine(memoised_tools, False))
    got = run_as_processes(monkeypatch, 2, lambda p: sample_all(
        HostShardedEngine(make_engine(memoised_tools, True), p, 2, lambda x: x, params)))
    for p in range(2):
        for (name, _, branches), plain, forked in zip(cases, want, got[p]):
            assert forked.metrics["branch/kv_forked"] == branches, (p, name)
            a, b = plain.batch.traj, forked.batch.traj
            np.testing.assert_array_equal(a.tokens, b.tokens, err_msg=f"process {p}, {name}")
            np.testing.assert_array_equal(a.parent, b.parent, err_msg=f"process {p}, {name}")
            np.testing.assert_allclose(a.behavior_logp, b.behavior_logp, rtol=1e-5, atol=1e-5)
