"""Build the ``mini-tasks`` tokenizer shipped in ``appo_jax/models/tokenizers/mini-tasks`` (byte-level BPE, 512 ids).

    python experiments/mini/build_tokenizer.py [--out appo_jax/models/tokenizers/mini-tasks]

Trained with the ``tokenizers`` library on the chat-rendered prompts and SFT traces (right and wrong) of
``kb_multihop`` and ``arith_program`` (tool outputs from the real ``kb`` search backend and python sandbox).
Byte-level, so any text round-trips exactly; digits are single tokens (never merged with a neighbour); ids 0, 1, 2 are ``<|endoftext|>`` (padding), ``<|im_start|>`` and
``<|im_end|>`` (end of turn = EOS). Deterministic: the same corpus gives the same files.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from appo_jax.data import get_task, load_dataset
from appo_jax.tools import build_registry

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
VOCAB_SIZE = 512
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "appo_jax" / "models" / "tokenizers" / "mini-tasks"


def render(messages: list[dict]) -> str:
    """The chat template above, applied in Python (the corpus is built before a tokenizer exists)."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def corpus(count: int = 300) -> list[str]:
    """Prompts and traces of both tasks, both splits (``count`` records each), right and wrong."""
    texts = []
    for name in ("kb_multihop", "arith_program"):
        task = get_task(name)
        search = {"backend": task.search_backend, "backend_kwargs": task.backend_kwargs()} if task.search_backend else {}
        with build_registry(("python", "search"), search=search) as tools:
            for split in task.splits:
                records = load_dataset(f"{name}:{split}", limit=count, seed=0)
                for wrong in (0.0, 1.0):
                    for rec, ex in zip(records, task.traces(records, tools, {"wrong_fraction": wrong})):
                        texts.append(render(rec.prompt) + "".join(s["text"] for s in ex["segments"]) + "<|im_end|>")
    return texts


def build(out: Path, count: int = 300) -> Tokenizer:
    """Train the tokenizer on `corpus` and write ``tokenizer.json`` + ``tokenizer_config.json`` to ``out``."""
    tok = Tokenizer(models.BPE())
    # every digit is a token of its own, never merged with a space or a bracket: "Add 5." and "(7 + 5)" share the
    # token "5", so writing an operand or a tool result into the answer is copying a token, not a lookup table
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(count), trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096, "pad_token": SPECIAL[0],
              "bos_token": SPECIAL[1], "eos_token": SPECIAL[2], "unk_token": None, "clean_up_tokenization_spaces": False,
              "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    return tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--count", type=int, default=300, help="records per task and split in the corpus")
    args = ap.parse_args()
    tok = build(args.out, args.count)
    print(json.dumps({"out": str(args.out), "vocab_size": tok.get_vocab_size()}))


if __name__ == "__main__":
    main()
