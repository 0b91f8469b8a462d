"""The CPU kernels for decode steps (`appo_jax.kernels`): the column-panel product against float64 NumPy over shapes
that hit every tail (rows past 8 and past `KERNEL_MAX_ROWS`, columns not a multiple of the panel, K of 1), the
decode attention against a float64 softmax (grouped heads, masks, rows with no visible slot), the packed decoder
against the plain one, the sampler against XLA, and the reasons they are not used."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from appo_jax.kernels import build, cpu_matmul
from appo_jax.kernels.cpu_attention import decode_attention
from appo_jax.models.decoder import forward, init_cache, pack_weights, unstack_layers
from appo_jax.models.loading import load_model
from appo_jax.parallel.mesh import make_mesh
from appo_jax.rollout.sampler import Sampler
from appo_jax.rollout.sampling import SamplingParams


@pytest.fixture(scope="module")
def kernel():
    ok, why = build.kernel_status()
    if not ok and why.startswith("no C++ compiler"):
        pytest.skip(why)  # the one condition outside the project: everything else must build here
    assert ok, why
    return ok


def test_pack_panels_is_the_documented_layout():
    w = jnp.arange(5 * 100, dtype=jnp.float32).reshape(5, 100)
    wp = np.asarray(cpu_matmul.pack_panels(w))
    assert wp.shape == (3, 5, 48)
    for p in range(3):
        for c in range(48):
            col = 48 * p + c
            np.testing.assert_array_equal(wp[p, :, c], np.asarray(w)[:, col] if col < 100 else 0)
    cols = jnp.array([[0, 47], [48, 99]])
    np.testing.assert_array_equal(cpu_matmul.panel_columns(jnp.asarray(wp), cols), np.asarray(w).T[np.asarray(cols)])


@pytest.mark.parametrize("weight_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("via", ["kernel", "panel_matmul"])
def test_panel_products_match_float64_numpy(kernel, weight_dtype, via):
    """`kernel_matmul` at any row count (passes of 8) and `panel_matmul` (the kernel up to `KERNEL_MAX_ROWS` rows,
    XLA's dot past it) against float64 NumPy."""
    rng = np.random.default_rng(0)
    fn = cpu_matmul.kernel_matmul if via == "kernel" else cpu_matmul.panel_matmul
    f = jax.jit(fn, static_argnums=2)
    for m, k, n in [(1, 576, 192), (2, 576, 1536), (3, 17, 47), (5, 1, 16), (8, 577, 15), (8, 64, 1), (11, 33, 100),
                    (16, 40, 577), (1, 1536, 576), (2, 9, 7), (9, 5, 49), (cpu_matmul.KERNEL_MAX_ROWS + 3, 20, 50)]:
        x = rng.standard_normal((m, k), dtype=np.float32)
        w = jnp.asarray(rng.standard_normal((k, n), dtype=np.float32), weight_dtype)
        y = np.asarray(f(x, cpu_matmul.pack_panels(w), n))
        w64 = np.asarray(w.astype(jnp.float32), np.float64)  # bf16 -> float32 is exact
        ref, bound = x.astype(np.float64) @ w64, np.abs(x).astype(np.float64) @ np.abs(w64)
        assert y.shape == (m, n) and y.dtype == np.float32
        assert np.all(np.abs(y - ref) <= 1e-6 * bound + 1e-30), (m, k, n, float(np.max(np.abs(y - ref) / bound)))


def _silu64(g):
    return g / (1.0 + np.exp(-g))


@pytest.mark.parametrize("weight_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("via", ["kernel", "panel"])
def test_the_fused_prologue_and_epilogues_match_float64_numpy(kernel, weight_dtype, via):
    """The residual added in the product's epilogue (`kernel_matmul` / `panel_matmul` with ``residual``), the SwiGLU
    product of two side-by-side panel sets (`kernel_swiglu` / `panel_swiglu`, gate sums from -60 to 60 so that
    silu's both branches and its saturation are hit) and the RMSNorm prologue (``norm``) against float64 NumPy, over
    every tail."""
    rng = np.random.default_rng(2)
    matmul = cpu_matmul.kernel_matmul if via == "kernel" else cpu_matmul.panel_matmul
    swiglu_fn = cpu_matmul.kernel_swiglu if via == "kernel" else cpu_matmul.panel_swiglu
    add, swiglu = jax.jit(matmul, static_argnums=2), jax.jit(swiglu_fn, static_argnums=2)
    for m, k, n in [(1, 576, 1536), (3, 17, 47), (8, 577, 15), (9, 5, 49), (2, 64, 1),
                    (cpu_matmul.KERNEL_MAX_ROWS + 3, 20, 50)]:
        x = rng.standard_normal((m, k), dtype=np.float32)
        w, up = (jnp.asarray(rng.standard_normal((k, n), dtype=np.float32), weight_dtype) for _ in range(2))
        w = w * jnp.asarray(np.linspace(-60, 60, n) / np.sqrt(k), weight_dtype)  # gate sums across silu's range
        r = rng.standard_normal((m, n), dtype=np.float32) * 10
        w64, up64 = (np.asarray(a.astype(jnp.float32), np.float64) for a in (w, up))
        x64 = x.astype(np.float64)
        bound = np.abs(x64) @ np.abs(w64)
        y = np.asarray(add(x, cpu_matmul.pack_panels(w), n, r))
        assert np.all(np.abs(y - (r + x64 @ w64)) <= 1e-6 * (bound + np.abs(r)) + 1e-30), (m, k, n)
        g, u = x64 @ w64, x64 @ up64
        y = np.asarray(swiglu(x, cpu_matmul.pack_swiglu(w, up), n))
        # silu is 1-Lipschitz-ish (|silu'| <= 1.1): the sums' error bounds carry through, plus silu's own rounding
        tol = 1.1e-6 * bound * np.abs(u) + np.abs(_silu64(g)) * 1e-6 * (np.abs(x64) @ np.abs(up64)) + 2e-6 * np.abs(
            _silu64(g) * u)
        assert y.shape == (m, n) and np.all(np.abs(y - _silu64(g) * u) <= tol + 1e-30), (m, k, n)
        scale, eps = rng.uniform(0.5, 2, k).astype(np.float32), 1e-5
        normed = x64 / np.sqrt(np.mean(x64**2, axis=-1, keepdims=True) + eps) * scale
        bound = np.abs(normed) @ np.abs(w64)
        norm = (jnp.asarray(scale), eps)  # eps: a static float (an attribute of the kernel call)
        y = np.asarray(jax.jit(lambda x, wp, n=n: matmul(x, wp, n, None, norm))(x, cpu_matmul.pack_panels(w)))
        assert np.all(np.abs(y - normed @ w64) <= 2e-6 * bound + 1e-30), (m, k, n)
        y = np.asarray(jax.jit(lambda x, wp, n=n: swiglu_fn(x, wp, n, norm))(x, cpu_matmul.pack_swiglu(w, up)))
        g, u = normed @ w64, normed @ up64
        tol = 2.2e-6 * bound * np.abs(u) + np.abs(_silu64(g)) * 2e-6 * (np.abs(normed) @ np.abs(up64)) + 2e-6 * np.abs(
            _silu64(g) * u)
        assert np.all(np.abs(y - _silu64(g) * u) <= tol + 1e-30), (m, k, n)


def test_pack_swiglu_is_the_documented_layout():
    gate, up = jnp.arange(6 * 50.0).reshape(6, 50), -jnp.arange(6 * 50.0).reshape(6, 50)
    wgu = np.asarray(cpu_matmul.pack_swiglu(gate, up))
    assert wgu.shape == (2, 2, 6, 48)
    np.testing.assert_array_equal(wgu[:, 0], cpu_matmul.pack_panels(gate))
    np.testing.assert_array_equal(wgu[:, 1], cpu_matmul.pack_panels(up))
    with pytest.raises(ValueError, match="one shape"):
        cpu_matmul.pack_swiglu(gate, up[:, :49])


def test_panel_products_refuse_what_they_cannot_compute(kernel):
    x = jnp.ones((2, 8), jnp.float32)
    wp = cpu_matmul.pack_panels(jnp.ones((8, 50), jnp.float32))
    with pytest.raises(ValueError, match="x \\[M, K\\] and wp"):
        cpu_matmul.panel_matmul(x, wp[:, :4], 50)
    with pytest.raises(ValueError, match="do not hold n = 97"):
        cpu_matmul.panel_matmul(x, wp, 97)
    with pytest.raises(ValueError, match="do not hold n = 48"):
        cpu_matmul.panel_matmul(x, wp, 48)  # the second panel would be empty
    with pytest.raises(ValueError, match="float32 x"):
        cpu_matmul.kernel_matmul(x.astype(jnp.bfloat16), wp, 50)
    with pytest.raises(ValueError, match="bfloat16 wp"):
        cpu_matmul.kernel_matmul(x, wp.astype(jnp.float16), 50)
    with pytest.raises(ValueError, match="residual must be \\[M, n\\]"):
        cpu_matmul.kernel_matmul(x, wp, 50, jnp.ones((2, 49)))
    with pytest.raises(ValueError, match="and residual"):
        cpu_matmul.kernel_matmul(x, wp, 50, jnp.ones((2, 50), jnp.bfloat16))
    with pytest.raises(ValueError, match="wp \\[panels, 2, K, 48\\]"):
        cpu_matmul.kernel_swiglu(x, wp, 50)  # one panel set where the gate's and the up's are needed
    with pytest.raises(ValueError, match="norm scale must be \\[K\\]"):
        cpu_matmul.kernel_matmul(x, wp, 50, norm=(jnp.ones(7), 1e-5))
    with pytest.raises(ValueError, match="a residual or a norm, not both"):
        cpu_matmul.panel_matmul(x, wp, 50, jnp.ones((2, 50)), (jnp.ones(8), 1e-5))


def _attention_float64(q, k, v, mask):
    """out[b, h] = sum_s softmax_s(q[b, h] . k[b, s, h // G] / sqrt(hd), masked at -1e30) v[b, s, h // G]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, h, hd = q.shape
    g = h // k.shape[2]
    out = np.zeros((b, h, hd))
    for i in range(b):
        for j in range(h):
            scores = k[i, :, j // g] @ q[i, j] / np.sqrt(hd)
            scores = np.where(mask[i], scores, -1e30)
            p = np.exp(scores - scores.max())
            out[i, j] = (p / p.sum()) @ v[i, :, j // g]
    return out


def test_decode_attention_matches_a_float64_softmax(kernel):
    rng = np.random.default_rng(1)
    f = jax.jit(decode_attention)
    shapes = [(2, 3, 37, 3, 9, 64), (1, 2, 16, 1, 4, 20), (3, 4, 70, 2, 2, 128), (1, 1, 1, 1, 1, 8)]
    for layers, b, s, kv, h, hd in shapes:  # L, B, S, KV, H, hd
        k = rng.standard_normal((layers, b, s, kv, hd), dtype=np.float32) * 2
        v = rng.standard_normal((layers, b, s, kv, hd), dtype=np.float32)
        q = rng.standard_normal((b, h, hd), dtype=np.float32)
        mask = rng.random((b, s)) < 0.6
        mask[0] = False                 # no visible slot: the uniform average
        mask[-1, rng.integers(s)] = True
        for layer in range(layers):
            out = np.asarray(f(q, k, v, layer, mask))
            ref = _attention_float64(q, k[layer], v[layer], mask)
            np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6 * np.abs(v).max())
    with pytest.raises(ValueError, match="H % KV == 0"):
        decode_attention(jnp.ones((1, 3, 8)), jnp.ones((1, 1, 4, 2, 8)), jnp.ones((1, 1, 4, 2, 8)), 0,
                         jnp.ones((1, 4), bool))
    with pytest.raises(ValueError, match="float32 q and caches"):
        decode_attention(jnp.ones((1, 2, 8), jnp.bfloat16), jnp.ones((1, 1, 4, 2, 8)), jnp.ones((1, 1, 4, 2, 8)), 0,
                         jnp.ones((1, 4), bool))


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-qwen3"])  # tied; lm_head + bias; q/k norm
def test_the_packed_decoder_computes_what_the_plain_one_does(kernel, preset):
    """`pack_weights` + ``cpu_kernels``: the same logits and cache as the plain decoder, for a prefill (XLA's dot
    over the panels past `KERNEL_MAX_ROWS` rows, the kernel below) and for decode steps over a cache (the panel
    kernel and the attention kernel), stacked or unstacked params in; the HLO calls the kernels where documented."""
    config, params, _ = load_model(preset, rng=jax.random.PRNGKey(1))
    packed_config = dataclasses.replace(config, cpu_kernels=True)
    packed = pack_weights(params, config)
    assert jax.tree.structure(pack_weights(unstack_layers(params), config)) == jax.tree.structure(packed)
    with pytest.raises(ValueError, match="does not fit the model's layout"):
        pack_weights(params, dataclasses.replace(config, hidden_size=config.hidden_size * 2))
    rows = 3
    prompt = cpu_matmul.KERNEL_MAX_ROWS // rows + 10  # a prefill past KERNEL_MAX_ROWS rows: XLA's dot
    tokens = (jnp.arange(rows * prompt).reshape(rows, prompt) * 7) % config.vocab_size
    positions = jnp.broadcast_to(jnp.arange(prompt), (rows, prompt))
    outs = {}
    for name, cfg, p in (("plain", config, params), ("packed", packed_config, packed)):
        cache = init_cache(cfg, rows, prompt + 8)
        logits, cache = forward(p, tokens, positions, config=cfg, cache=cache)
        steps = [logits]
        for t in range(3):
            tok = jnp.full((rows, 1), 5 + t)
            step, cache = forward(p, tok, jnp.full((rows, 1), prompt + t), config=cfg, cache=cache)
            steps.append(step)
        outs[name] = (steps, cache)
    for a, b in zip(outs["plain"][0], outs["packed"][0]):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(outs["plain"][1].k, outs["packed"][1].k, atol=2e-5, rtol=1e-5)
    step_hlo = jax.jit(lambda p, c: forward(p, jnp.ones((rows, 1), jnp.int32), jnp.ones((rows, 1), jnp.int32),
                                            config=packed_config, cache=c)).lower(packed, cache).as_text()
    for target in ("appo_panel_matmul", "appo_panel_matmul_add", "appo_panel_swiglu", "appo_decode_attention"):
        assert f"@{target}(" in step_hlo, target
    prefill_hlo = jax.jit(lambda p: forward(p, tokens, positions, config=packed_config)[0]).lower(packed).as_text()
    assert "appo_panel" not in prefill_hlo and "appo_decode_attention" not in prefill_hlo
    for plain in (params, unstack_layers(params)):
        with pytest.raises(ValueError, match="takes packed params"):
            forward(plain, tokens, positions, config=packed_config)
    with pytest.raises(ValueError, match="packed already"):
        pack_weights(packed, config)


@pytest.mark.parametrize("preset, weights", [("tiny-llama", "float32"),    # a tied embedding: the nk kernel
                                             ("tiny-qwen2", "bfloat16")])  # lm_head + q/k/v bias, bf16 weights
def test_the_sampler_with_cpu_kernels_samples_what_xla_does(kernel, preset, weights):
    """The same tokens and log-probs with the kernels as with XLA (bf16 weights: XLA widens them to float32 before
    its dot, the kernel in registers; the same products either way); the sampler's weights are packed."""
    config, params, _ = load_model(preset, rng=jax.random.PRNGKey(3), dtype="float32", param_dtype=weights)
    outs = []
    for cpu_kernels in (False, True):
        s = Sampler(config, params, num_slots=4, max_len=64, decode_chunk=6, min_attention_window=64,
                    sampling=SamplingParams(1.0), eos_token_ids=(), cpu_kernels=cpu_kernels)
        assert s.cpu_kernels_status[0] == cpu_kernels and s.config.cpu_kernels == cpu_kernels
        assert ("layers_0" in s.params and "gate_up_proj" in s.params["layers_0"]["mlp"]) == cpu_kernels
        s.start([0, 1, 2], [[1, 8, 21, 7], [1, 5], [3, 3, 3]], [jax.random.key(i) for i in range(3)])
        a = s.decode(np.array([True, True, True, False]), 6)
        s.append([0], [[40, 41]])  # an extend of 4 x 2 rows: the kernel's 8-row case
        b = s.decode(np.array([True, True, True, False]), 6)
        outs.append((a, b))
    for x, y in zip(*outs):
        np.testing.assert_array_equal(x.tokens, y.tokens)
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)
        np.testing.assert_allclose(x.entropies, y.entropies, atol=1e-4)


def test_the_sampler_says_why_it_does_not_use_the_kernel(monkeypatch):
    config, params, _ = load_model("tiny-llama", dtype="bfloat16")
    s = Sampler(config, params, num_slots=2, max_len=32, cpu_kernels=True)
    assert s.cpu_kernels_status == (False, "the sampler computes in bfloat16 with bfloat16 weights, not float32 "
                                           "with float32 or bfloat16 weights")
    assert not s.config.cpu_kernels
    config, params, _ = load_model("tiny-llama")
    mesh = make_mesh(data=2, devices=jax.devices()[:2])
    assert Sampler(config, params, num_slots=2, max_len=32, cpu_kernels=True, mesh=mesh).cpu_kernels_status == (
        False, "the sampler is sharded over 2 devices")
    assert Sampler(config, params, num_slots=2, max_len=32).cpu_kernels_status == (False, "not asked for")
    spread = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    assert Sampler(config, spread, num_slots=2, max_len=32, cpu_kernels=True).cpu_kernels_status == (
        False, "the weights are spread over 2 devices")
    # no compiler: the status says so (and the kernel is never called)
    monkeypatch.setenv("CXX", "no-such-compiler-appo")
    build.kernel_status.cache_clear()
    try:
        assert build.kernel_status() == (False, "no C++ compiler (no-such-compiler-appo) on PATH")
        s = Sampler(config, params, num_slots=2, max_len=32, cpu_kernels=True)
        assert not s.cpu_kernels_status[0] and not s.config.cpu_kernels
    finally:
        build.kernel_status.cache_clear()


def test_a_failed_build_is_a_reason_not_a_crash(monkeypatch, tmp_path):
    fake = tmp_path / "fakecxx"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo fake 1.0; exit 0; }\necho 'fake: no' >&2; exit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path / "kernels"))
    build.kernel_status.cache_clear()
    try:
        ok, why = build.kernel_status()
        assert not ok and why.startswith("building the CPU kernels failed") and "fake: no" in why
        assert not list((tmp_path / "kernels").glob("*.so"))
    finally:
        build.kernel_status.cache_clear()


def test_the_sampler_keeps_its_weights_in_the_configs_param_dtype():
    """``rollout.weights_dtype``: a float32 policy given to a sampler whose config says bfloat16 weights is cast once
    (and samples what a sampler given the bf16 weights directly samples); a bad dtype is one clear error."""
    from appo_jax.rollout.config import RolloutConfig
    config, params, _ = load_model("tiny-llama", rng=jax.random.PRNGKey(5))
    bf16 = dataclasses.replace(config, param_dtype="bfloat16")
    cast = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    outs = []
    for weights in (params, cast):
        s = Sampler(bf16, weights, num_slots=2, max_len=32, decode_chunk=4, sampling=SamplingParams(0.0),
                    eos_token_ids=())
        assert {x.dtype for x in jax.tree.leaves(s.params)} == {jnp.dtype(jnp.bfloat16)}
        s.start([0, 1], [[1, 8, 21], [1, 5]], [jax.random.key(0), jax.random.key(1)])
        outs.append(s.decode(np.array([True, True]), 4))
        s.set_params(params)  # a new float32 policy: cast again
        assert {x.dtype for x in jax.tree.leaves(s.params)} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
    np.testing.assert_array_equal(outs[0].logprobs, outs[1].logprobs)
    with pytest.raises(ValueError, match="rollout.weights_dtype='int8'"):
        RolloutConfig(weights_dtype="int8")
