"""`appo-jax serve`: an OpenAI-compatible HTTP server (chat / completions, streaming) over the jitted sampler.

* `scheduler` -- `BatchScheduler`: one background thread that owns a `appo_jax.rollout.sampler.Sampler` and runs
  continuous batching (requests join the running batch at every decode-chunk boundary);
* `generated_text` -- incremental detokenization of a request's generated tokens, its stop strings and the
  streaming hold-back;
* `tokenizer_access` -- `SharedTokenizer`: the one tokenizer, locked, for prompts, generated text and log-probs;
* `openai_requests` -- validation of OpenAI request bodies into a `GenerationSpec` (4xx errors naming the field);
* `openai_responses` -- OpenAI response, stream-chunk, logprobs and error bodies;
* `app` -- the Starlette ASGI app (``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``, ``/health``);
* `commands` -- the ``serve`` sub-command (uvicorn).

docs/serving.md describes the endpoints, what is honoured and refused, and the batching design.
"""
