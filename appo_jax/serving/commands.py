"""CLI: ``appo-jax serve`` -- an OpenAI-compatible HTTP server for a policy (wired into ``appo_jax.cli``).

    appo-jax serve --model smollm2-135m-instruct --port 8000
    appo-jax serve --model runs/my_run@30 --served-model-name my-run --num-slots 16 --max-len 4096
    appo-jax serve --model tiny-llama --tokenizer smollm2-135m-instruct --max-len 256 --port 0

``--model`` is anything `appo_jax.training.policy_source.resolve_policy` accepts (a preset with ``--tokenizer``,
smollm2-135m-instruct, a .gguf file, an HF directory, a ``train`` workdir or ``WORKDIR@STEP``). When the server
listens it prints one line ``appo-jax serve: ready on http://HOST:PORT (model ..., model_id ..., N slots,
context C tokens)`` (``--port 0`` picks a free port; the line names it). docs/serving.md has the endpoints.
"""
from __future__ import annotations

import sys


def _ready_line(url: str, args, model_id: str, context: int) -> str:
    return (f"appo-jax serve: ready on {url} (model {args.served_model_name or args.model}, model_id {model_id}, "
            f"{args.num_slots} slots, context {context} tokens)")


def _check(args) -> None:
    if args.num_slots < 1:
        raise ValueError(f"--num-slots must be >= 1, got {args.num_slots}")
    if args.max_len < 2:
        raise ValueError(f"--max-len must be >= 2 (a prompt token and a generated one), got {args.max_len}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535] (0: a free port), got {args.port}")
    if args.decode_chunk < 1:
        raise ValueError(f"--decode-chunk must be >= 1, got {args.decode_chunk}")


def _serve(args) -> int:
    _check(args)
    # deferred: jax, the model code and the HTTP stack take seconds to import (start-up of the CLI)
    import uvicorn

    from appo_jax.serving.app import create_app
    from appo_jax.serving.scheduler import BatchScheduler
    from appo_jax.serving.tokenizer_access import SharedTokenizer
    from appo_jax.training.policy_source import resolve_policy

    print(f"appo-jax serve: loading {args.model}", file=sys.stderr, flush=True)
    policy = resolve_policy(args.model, args.tokenizer or "", args.dtype)
    limit = policy.config.max_position_embeddings
    if args.max_len > limit:
        raise ValueError(f"--max-len {args.max_len} exceeds the model's max_position_embeddings ({limit})")
    tokenizer = SharedTokenizer(policy.tokenizer)
    scheduler = BatchScheduler(policy.config, policy.params, tokenizer.detokenize, num_slots=args.num_slots,
                               context_len=args.max_len, seed=args.seed, decode_chunk=args.decode_chunk)
    app = create_app(scheduler, tokenizer, model_name=args.served_model_name or args.model,
                     model_id=policy.model_id)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            host = f"[{host}]" if ":" in host else host
            print(_ready_line(f"http://{host}:{port}", args, policy.model_id, args.max_len), flush=True)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=5)
    Server(config).run()
    return 0


def register(subparsers) -> None:
    """Add the ``serve`` subcommand."""
    examples = "examples:\n" + "\n".join(line for line in __doc__.splitlines() if line.startswith("    appo-jax"))
    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server (chat / completions, streaming, continuous batching)",
        description="Serve a policy over HTTP with OpenAI's /v1/chat/completions, /v1/completions and /v1/models "
                    "(plus /health), batching concurrent requests continuously on the jitted sampler "
                    "(docs/serving.md).",
        epilog=examples + "\n")
    p.add_argument("--model", required=True,
                   help="preset name (random weights, needs --tokenizer), smollm2-135m-instruct, a .gguf file, an HF "
                        "directory, a train workdir or WORKDIR@STEP")
    p.add_argument("--tokenizer", help="tokenizer instead of the model's own (smollm2-135m-instruct, a .gguf file or "
                                       "an HF directory); required for a random preset (default: the model's own)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: a free one, printed when ready)")
    p.add_argument("--served-model-name", help="the model name clients use (default: the --model string)")
    p.add_argument("--max-len", type=int, default=2048,
                   help="context per request: prompt + generated tokens (each of the --num-slots cache rows fits it)")
    p.add_argument("--num-slots", type=int, default=8, help="requests generated concurrently (KV-cache rows)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    p.add_argument("--seed", type=int, default=0, help="server PRNG seed (requests without a seed)")
    p.add_argument("--decode-chunk", type=int, default=8,
                   help="tokens per slot between chunk boundaries (admission, cancellation, streaming)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (info logs every request)")
    p.set_defaults(func=_serve)
