"""What makes a second run fast and a long run readable: the converted-GGUF model cache, JAX's persistent
compilation cache behind the CLI, rollout configs fitted to a call, and the progress bars' counts."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from appo_jax.compilation_cache import default_cache_dir
from appo_jax.models import gguf_io
from appo_jax.models.loading import find_smollm2_gguf
from appo_jax.progress import RolloutProgress
from appo_jax.data.records import Record
from appo_jax.rollout.config import RolloutConfig


def test_converted_gguf_equals_reading_the_gguf(monkeypatch):
    """The cached HF directory gives exactly the GGUF's config, float32 weights and tokenizer."""
    path = find_smollm2_gguf()
    cached_dir = gguf_io.converted_gguf_dir(path)
    assert cached_dir is not None and (cached_dir / "model.safetensors").is_file()
    assert gguf_io.converted_gguf_dir(path) == cached_dir  # keyed by the file: found again, not re-converted
    config, params = gguf_io.load_gguf(path, dtype="float32", param_dtype="float32")
    tok = gguf_io.load_gguf_tokenizer(path)
    monkeypatch.setenv(gguf_io.MODEL_CACHE_ENV, "off")
    assert gguf_io.converted_gguf_dir(path) is None
    ref_config, ref_params = gguf_io.load_gguf(path, dtype="float32", param_dtype="float32")
    ref_tok = gguf_io.load_gguf_tokenizer(path)
    assert config == ref_config
    assert jax.tree.structure(params) == jax.tree.structure(ref_params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    messages = [{"role": "system", "content": "Use <python> and \\boxed{}."}, {"role": "user", "content": "2+2?"}]
    for text in ("<think>x</think> <search>q</search> \\boxed{12}", "  spaces\n\n é 中文 </answer>"):
        assert tok.encode(text) == ref_tok.encode(text)
    assert (tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    assert (tok.eos_token_id, tok.pad_token_id, len(tok)) == (ref_tok.eos_token_id, ref_tok.pad_token_id, len(ref_tok))
    assert type(tok) is type(ref_tok)


def _tensorboard_scalars(folder: Path) -> dict:
    """(step, tag) -> value of every scalar in the TensorBoard event files under ``folder`` (TFRecord framing:
    length, its CRC, the Event proto, its CRC)."""
    import struct
    from tensorboardX.proto.event_pb2 import Event
    scalars = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            scalars.update({(event.step, v.tag): v.simple_value for v in event.summary.value})
    return scalars


def test_tensorboard_scalars_are_written_without_importing_torch(tmp_path):
    code = ("import sys; from appo_jax.training.metrics import MetricsWriter; "
            f"w = MetricsWriter({str(tmp_path)!r}, total_steps=2, progress=False); "
            "w.write(1, {'reward/mean': 0.25, 'train/loss': float('nan')}); w.write(2, {'reward/mean': 0.5}); "
            "w.close(); print('torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "False"  # tensorboardX loaded without torch (appo_jax.training.metrics)
    assert _tensorboard_scalars(tmp_path / "tensorboard") == {(1, "reward/mean"): 0.25, (2, "reward/mean"): 0.5}


@pytest.mark.parametrize("tokenizer_class", ["PreTrainedTokenizerFast", "GPT2TokenizerFast"])
def test_a_directory_tokenizer_is_what_autotokenizer_gives(tmp_path, tokenizer_class):
    """`load_hf_tokenizer` skips AutoTokenizer's imports for the tokenizers backend class only: the same class,
    ids, text and chat template as ``AutoTokenizer.from_pretrained``, and a model-specific class goes through it."""
    import json
    import shutil
    from transformers import AutoTokenizer
    from appo_jax.models.hf_io import load_hf_tokenizer
    shipped = Path(gguf_io.__file__).parent / "tokenizers" / "mini-tasks"
    folder = tmp_path / "tok"
    shutil.copytree(shipped, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": tokenizer_class}))
    tok, ref = load_hf_tokenizer(str(folder)), AutoTokenizer.from_pretrained(str(folder))
    assert type(tok) is type(ref)
    text = "Compute 12 + 30. <python>print(42)</python> \\boxed{42}"
    assert tok.encode(text) == ref.encode(text) and tok.decode(tok.encode(text)) == ref.decode(ref.encode(text))
    messages = [{"role": "user", "content": text}]
    assert (tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    assert (tok.eos_token_id, tok.pad_token_id, len(tok)) == (ref.eos_token_id, ref.pad_token_id, len(ref))
    assert load_hf_tokenizer(str(tmp_path)) is None


def test_model_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(gguf_io.MODEL_CACHE_ENV, str(tmp_path / "models"))
    assert gguf_io.gguf_cache_root() == tmp_path / "models"
    monkeypatch.setenv(gguf_io.MODEL_CACHE_ENV, "off")
    assert gguf_io.gguf_cache_root() is None
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        gguf_io.converted_gguf_dir(str(tmp_path / "missing.gguf"))


def test_compile_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("APPO_JAX_COMPILE_CACHE", str(tmp_path / "cc"))
    assert default_cache_dir() == tmp_path / "cc"
    monkeypatch.setenv("APPO_JAX_COMPILE_CACHE", "off")
    assert default_cache_dir() is None
    monkeypatch.delenv("APPO_JAX_COMPILE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "appo_jax" / "jax_compilation"


def _generate(cache: Path, *flags: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "APPO_JAX_COMPILE_CACHE"}
    cmd = [sys.executable, "-m", "appo_jax.cli", "--compile-cache-dir", str(cache), *flags, "generate",
           "--model", "tiny-llama", "--prompt-ids", "1 5 9", "--max-new-tokens", "6", "--json"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_a_second_cli_run_compiles_nothing(tmp_path):
    """The first `appo-jax generate` writes its compiled programs to the cache; a second identical run finds every
    one of them (it writes no new entry); --no-compile-cache writes nothing."""
    cache = tmp_path / "cc"
    _generate(cache)
    first = sorted(p.name for p in cache.iterdir())
    assert len(first) >= 3  # prefill pieces, decode loop, ...
    _generate(cache)
    assert sorted(p.name for p in cache.iterdir()) == first
    off = tmp_path / "off"
    _generate(off, "--no-compile-cache")
    assert not off.exists() or not any(off.iterdir())


def test_rollout_config_fitted_to_a_call():
    cfg = RolloutConfig(max_prompt_len=2048, max_response_len=512, num_slots=32)
    prompts = [Record(str(n), "q", ["x"], "t", "t", "qa", [], tuple(range(n))) for n in (70, 300, 129)]
    fitted = cfg.fitted(prompts, rollouts=12)
    assert (fitted.max_prompt_len, fitted.num_slots) == (320, 12)  # 300 rounded up to a multiple of 64
    assert dataclasses.replace(fitted, max_prompt_len=2048, num_slots=32) == cfg  # nothing else changes
    assert cfg.fitted(prompts, rollouts=100).num_slots == 32          # never above the configured bounds
    assert cfg.fitted([dataclasses.replace(prompts[0], prompt_ids=tuple(range(4000)))], 1).max_prompt_len == 2048
    assert RolloutConfig(num_slots=0).fitted(prompts, rollouts=12).num_slots == 12  # 0: one slot per rollout


def test_rollout_progress_adds_up_over_runs(capsys):
    with RolloutProgress("test") as bar:
        bar(0, 8, 0)     # a run enqueues 8 requests
        bar(3, 0, 120)   # 3 finish, 120 tokens
        bar(5, 2, 80)    # branching added 2, the rest finished
        bar(0, 4, 0)     # a second run (e.g. a Tree-GRPO round) adds 4
        bar(6, 0, 50)
        assert (bar.bar.n, bar.bar.total, bar.tokens) == (14, 14, 250)
    err = capsys.readouterr().err
    assert "14/14" in err and "250 tokens" in err and "tok/s" in err
