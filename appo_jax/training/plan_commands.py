"""CLI: ``appo-jax plan`` -- per-device memory of a model + mesh + batch (nothing is allocated); with
``--compare-xla`` next to XLA's compiled memory analysis of the real train step on the local devices; with
``--config FILE[:ARG]`` the experiment config's model / batch / sequences planned on every candidate TPU slice
(:data:`SLICES`), naming the smallest slice it fits (`plan_config`, docs/paper_configs.md)."""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import sys
from dataclasses import dataclass

from appo_jax.models.loading import load_config
from appo_jax.models.memory_plan import GIB, plan_memory
from appo_jax.models.presets import PRESETS


def _mesh(text: str) -> tuple[int, int, int]:
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3:
        raise argparse.ArgumentTypeError(f"--mesh wants DATA,FSDP,TENSOR (e.g. 1,8,1), got {text!r}")
    return sizes


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="per-device bytes of params / optimizer / activations / KV cache; the TPU slice a config fits",
        description="Plan the per-device memory of training a model on a mesh (params, optimizer, gradients, "
                    "activations, the sampler's KV cache) without allocating anything; one JSON line. "
                    "--compare-xla also compiles the real train step and compares with XLA's memory analysis. "
                    "--config FILE[:ARG] plans an experiment config on candidate TPU slices (v4, v5e, v5p, v6e) "
                    "and names the smallest it fits.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="preset name, HF directory or .gguf file")
    what.add_argument("--config", help="experiment config FILE.py[:ARG] (e.g. "
                                       "experiments/paper/table1_reasoning.py:qwen2.5-7b,appo): its model, batch "
                                       "and sequences on every candidate TPU slice; no weights are read")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="with --config: override a config field")
    p.add_argument("--slices", default="", help="with --config: comma-separated families or slices to try "
                                                "(e.g. v5p or v5p-64,v4; default: all of SLICES)")
    p.add_argument("--headroom", type=float, default=0.9,
                   help="with --config: the fraction of a chip's HBM a plan may use (default 0.9)")
    p.add_argument("--table", action="store_true",
                   help="with --config: a markdown table (one line per slice) instead of the JSON line")
    p.add_argument("--mesh", type=_mesh, default=(1, 1, 1), help="DATA,FSDP,TENSOR sizes (default: 1,1,1)")
    p.add_argument("--batch", type=int, default=16, help="sequences per train step (global)")
    p.add_argument("--seq-len", type=int, default=8192, help="prompt + response tokens per sequence")
    p.add_argument("--micro-batches", type=int, default=1, help="micro-batches per train step (gradient accumulation)")
    p.add_argument("--kv-batch", type=int, default=0, help="sampler slots (global; 0 = no KV cache)")
    p.add_argument("--kv-len", type=int, default=0, help="sampler cache length per slot")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype")
    p.add_argument("--param-dtype", default="float32", help="parameter (master weight) dtype")
    p.add_argument("--remat", default="full", help="remat policy (none, full, dots, ...)")
    p.add_argument("--prompt-len", type=int, default=0,
                   help="prompt tokens of --seq-len (the log-prob head scores the rest; default: 0, with "
                        "--compare-xla seq-len / 4)")
    p.add_argument("--logprob-chunk", type=int, default=512, help="train.logprob_chunk (log-prob head chunk)")
    p.add_argument("--compare-xla", action="store_true",
                   help="also compile the real train step on the local devices (abstract inputs, nothing "
                        "allocated) and print XLA's per-device memory analysis and the plan's relative errors; "
                        "use a small config (on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=8 for "
                        "a mesh of 8)")
    p.set_defaults(func=run_plan)


def run_plan(args) -> int:
    if args.config:
        return _run_config(args)
    config = load_config(args.model, dtype=args.dtype, param_dtype=args.param_dtype, remat_policy=args.remat)
    data, fsdp, tensor = args.mesh
    if args.compare_xla:
        return _compare(args, config)
    plan = plan_memory(config, data=data, fsdp=fsdp, tensor=tensor, batch=args.batch, seq_len=args.seq_len,
                       micro_batches=args.micro_batches, kv_batch=args.kv_batch, kv_len=args.kv_len,
                       prompt_len=args.prompt_len, logprob_chunk=args.logprob_chunk)
    print(json.dumps({"model": args.model, **plan}))
    return 0


def _compare(args, config) -> int:
    import jax

    # deferred: compiling the train step pulls in the trainer's modules; a plain plan needs none of them
    from appo_jax.training.compiled_memory import compare_with_xla

    data, fsdp, tensor = args.mesh
    if data * fsdp * tensor > jax.device_count():
        print(f"error: --mesh {data},{fsdp},{tensor} needs {data * fsdp * tensor} devices, {jax.device_count()} "
              f"available (on CPU: XLA_FLAGS=--xla_force_host_platform_device_count={data * fsdp * tensor})",
              file=sys.stderr)
        return 2
    result = compare_with_xla(config, data=data, fsdp=fsdp, tensor=tensor, batch=args.batch, seq_len=args.seq_len,
                              micro_batches=args.micro_batches, prompt_len=args.prompt_len or None,
                              logprob_chunk=args.logprob_chunk)
    out = {"model": args.model, "mesh": {"data": data, "fsdp": fsdp, "tensor": tensor},
           "device": jax.devices()[0].device_kind, **result}
    if config.dtype != "float32" and jax.default_backend() == "cpu":
        out["note"] = "XLA:CPU computes bfloat16 in float32; compare activations with --dtype float32"
    print(json.dumps(out))
    return 0


# ---------------------------------------------------------------------------------------------------- TPU slices
@dataclass(frozen=True)
class Slice:
    """A Cloud TPU slice: ``name`` (``v5e-8``; v4 / v5p names count TensorCores, 2 per chip, v5e / v6e names
    count chips), ``accelerator_type`` (gcloud's ``--accelerator-type``, ``v5litepod-N`` for v5e), ``chips``,
    ``chips_per_host`` (the devices one process sees) and ``hbm_gib`` per chip."""

    name: str
    accelerator_type: str
    chips: int
    chips_per_host: int
    hbm_gib: float

    @property
    def hosts(self) -> int:
        return max(1, self.chips // self.chips_per_host)


def _family(prefix: str, gcloud: str, cores_per_chip: int, hbm_gib: float, sizes, host_chips) -> list[Slice]:
    """The slices ``prefix-N`` for N in ``sizes``; ``host_chips(chips)``: the chips of one host."""
    out = []
    for size in sizes:
        chips = size // cores_per_chip
        out.append(Slice(f"{prefix}-{size}", f"{gcloud}-{size}", chips, min(chips, host_chips(chips)), hbm_gib))
    return out


#: Candidate slices, smallest first within a family. HBM per chip: v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e 32 GiB.
#: Hosts: v4 / v5p 4 chips each; v5e / v6e: one 8-chip host for the 8-chip slice, 4-chip hosts beyond.
SLICES: tuple[Slice, ...] = tuple(
    _family("v4", "v4", 2, 32, (8, 16, 32, 64, 128, 256, 512), lambda c: 4)
    + _family("v5e", "v5litepod", 1, 16, (8, 16, 32, 64, 128, 256), lambda c: 8 if c == 8 else 4)
    + _family("v5p", "v5p", 2, 95, (8, 16, 32, 64, 128, 256, 512), lambda c: 4)
    + _family("v6e", "v6e", 1, 32, (8, 16, 32, 64, 128, 256), lambda c: 8 if c == 8 else 4))


def select_slices(spec: str) -> tuple[Slice, ...]:
    """The slices of ``spec``: comma-separated family prefixes (``v5p``) or slice names (``v5p-64``); empty =
    all. ValueError naming the known ones for an unknown entry."""
    if not spec.strip():
        return SLICES
    chosen: list[Slice] = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        hits = [s for s in SLICES if s.name == item or s.name.startswith(item + "-") or s.accelerator_type == item]
        if not hits:
            raise ValueError(f"unknown TPU slice or family {item!r}; known: v4, v5e, v5p, v6e or one of "
                             f"{', '.join(s.name for s in SLICES)}")
        chosen += [s for s in hits if s not in chosen]
    return tuple(chosen)


# ---------------------------------------------------------------------------------------------------- a config
def _normalised(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower().removesuffix("-instruct"))


def config_model(cfg):
    """``(ModelConfig, source)`` of ``cfg.model`` (its dtype / param dtype / remat overrides applied) without
    reading weights: the preset, HF directory or GGUF it names, else the preset of the same architecture as
    its directory's name (``~/models/Qwen2.5-7B-Instruct`` -> ``qwen2.5-7b``), so a config planned on a machine
    without the checkpoint gets the real shapes. ValueError naming the presets otherwise."""
    m = cfg.model
    overrides = {k: v for k, v in (("dtype", m.dtype), ("param_dtype", m.param_dtype),
                                   ("remat_policy", m.remat_policy)) if v}
    name = m.name
    if name not in PRESETS and not os.path.exists(name):
        by_arch = {_normalised(p): p for p in PRESETS}
        preset = by_arch.get(_normalised(os.path.basename(name.rstrip("/"))))
        if preset is None:
            raise ValueError(f"model.name={name!r} is neither a preset, an existing HF directory / .gguf file nor "
                             f"named like a preset ({', '.join(sorted(PRESETS))}); plan with --set model.name=PRESET")
        name = preset
    return load_config(name, **overrides), name


@dataclass(frozen=True)
class Layout:
    """What a config asks of each device, whatever the slice: ``mini_rows`` rows per optimizer update of
    ``seq_len`` = ``prompt_len`` + response tokens, ``micro_rows`` per accumulation step, ``logprob_chunk``;
    the sampler's ``slots`` (``rollout.num_slots``, 0 = every rollout of a step: ``prompts x n``) of
    ``kv_len`` tokens; ``reference``: a second copy of the params (the KL / Omega reference or ``kl_to_start``)."""

    mini_rows: int
    micro_rows: int
    seq_len: int
    prompt_len: int
    logprob_chunk: int
    prompts: int
    rollouts_per_prompt: int
    slots: int
    kv_len: int
    reference: bool
    mesh: tuple[int, int, int]


def config_layout(cfg) -> Layout:
    """The :class:`Layout` of ``cfg`` (validated first: a bad config is a ConfigError, not a plan)."""
    from appo_jax.training.config import rows_per_mini_batch, validate  # deferred: plan start-up

    validate(cfg)
    r, t = cfg.rollout, cfg.train
    mini = rows_per_mini_batch(cfg)
    reference = (cfg.loss.kl_coef > 0 or cfg.logging.kl_to_start
                 or cfg.algorithm.omega_baseline in ("reference", "lagged"))
    return Layout(mini, t.micro_batch_rows or mini, r.max_prompt_len + r.max_response_len, r.max_prompt_len,
                  t.logprob_chunk, t.prompts_per_step, cfg.algorithm.n, r.num_slots,
                  _cache_len(r.max_prompt_len, r.max_response_len, r.tool_call_limit),
                  bool(reference), (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))


@functools.lru_cache(maxsize=64)
def _cache_len(prompt_len: int, response_len: int, tool_calls: int) -> int:
    """The sampler's cache row (`rollout_cache_len` at the engine's prefill chunk of 128, make_slot_sampler)."""
    from appo_jax.rollout.slots import rollout_cache_len  # deferred: plan start-up

    return rollout_cache_len(prompt_len, response_len, tool_calls, 128)


@functools.lru_cache(maxsize=1024)
def _kv_bytes(model_config, slots: int, kv_len: int, mesh: tuple[int, int, int]) -> int:
    import jax

    from appo_jax.models.kv_cache import init_cache  # deferred: plan start-up
    from appo_jax.parallel.mesh import abstract_mesh  # deferred: plan start-up
    from appo_jax.parallel.rules import DEFAULT_RULES, sharded_bytes  # deferred: plan start-up

    cache = jax.eval_shape(lambda: init_cache(model_config, slots, kv_len))
    return sharded_bytes(cache, cache.logical_axes(), abstract_mesh(*mesh), DEFAULT_RULES)


def plan_on(model_config, layout: Layout, slc: Slice, mesh: tuple[int, int, int], micro_rows: int,
            headroom: float = 0.9, host_local: bool = True) -> dict:
    """Per-device bytes of ``layout`` on ``slc`` with ``mesh`` = (data, fsdp, tensor) and ``micro_rows`` rows per
    micro-batch: `plan_memory`'s train step, plus the reference copy of the params (``layout.reference``), the
    sampler's KV cache and, on several hosts, the sampler's own copy of the params (each host samples on its
    devices, so fsdp x tensor must divide a host's chips: docs/multihost.md). ``host_local=False`` plans a
    sampler that spans the hosts on the run's mesh instead (not implemented: what the plan would be without that
    limit). ``reason`` says why the layout cannot run there (no bytes then); ``fits``: the total is at most
    ``headroom`` of the chip's HBM."""
    data, fsdp, tensor = mesh
    shards, hosts = data * fsdp, (slc.hosts if host_local else 1)
    if data * fsdp * tensor > slc.chips or (slc.hosts > 1 and data * fsdp * tensor != slc.chips):
        return {"reason": f"mesh {data} x {fsdp} x {tensor} does not match the {slc.chips} chips"}
    if micro_rows % shards or layout.mini_rows % micro_rows:
        return {"reason": f"no micro-batch of the mini-batch's {layout.mini_rows} rows splits over data x fsdp "
                          f"= {shards} devices"}
    if hosts > 1 and slc.chips_per_host % (fsdp * tensor):
        return {"reason": f"each host samples on its {slc.chips_per_host} chips, which fsdp x tensor = "
                          f"{fsdp} x {tensor} does not divide (docs/multihost.md)"}
    if layout.prompts % hosts:
        return {"reason": f"train.prompts_per_step={layout.prompts} does not split over {hosts} hosts"}
    plan = plan_memory(model_config, data=data, fsdp=fsdp, tensor=tensor, batch=layout.mini_rows,
                       seq_len=layout.seq_len, micro_batches=layout.mini_rows // micro_rows,
                       prompt_len=layout.prompt_len, logprob_chunk=layout.logprob_chunk)
    parts = dict(plan["bytes_per_device"])
    del parts["total"]
    local = (slc.chips_per_host // (fsdp * tensor), fsdp, tensor) if hosts > 1 else mesh
    rollouts = layout.prompts // hosts * layout.rollouts_per_prompt
    slots = min(layout.slots, rollouts) if layout.slots else rollouts
    slots = -(-slots // (local[0] * local[1])) * local[0] * local[1]
    parts["kv_cache"] = _kv_bytes(model_config, slots, layout.kv_len, local)
    parts["reference"] = parts["params"] if layout.reference else 0
    parts["sampler_params"] = parts["params"] if hosts > 1 else 0
    total = sum(parts.values())
    return {"mesh": {"data": data, "fsdp": fsdp, "tensor": tensor}, "micro_batch_rows": micro_rows,
            "sampler_slots_per_host": slots, "fits": total <= headroom * slc.hbm_gib * GIB,
            "gib_per_device": {k: round(v / GIB, 2) for k, v in {**parts, "total": total}.items()}}


def _resolved(layout: Layout, slc: Slice) -> tuple[int, int, int] | None:
    """The config's mesh on ``slc`` (a -1 axis filled with the remaining chips; without one, a mesh may use fewer
    than the chips of one host, as `resolve_mesh_shape` allows), or None if it does not fit."""
    sizes = layout.mesh
    known = math.prod(s for s in sizes if s != -1)
    fixed_ok = known == slc.chips or (slc.hosts == 1 and known < slc.chips)
    if sizes.count(-1) > 1 or (slc.chips % known if -1 in sizes else not fixed_ok):
        return None
    return tuple(slc.chips // known if s == -1 else s for s in sizes)


def _candidates(layout: Layout, slc: Slice, host_local: bool = True) -> list[tuple[tuple[int, int, int], int]]:
    """(mesh, micro-batch rows) to try on ``slc``, in order: the config's own (its mesh resolved on the slice's
    chips), then FSDP over one host's chips (over the slice on one host) with tensor 1, 2, 4 and data the rest,
    each with the config's micro-batch and with one row per device."""
    own = _resolved(layout, slc)
    out = [(own, layout.micro_rows)] if own else []
    local = slc.chips_per_host if host_local and slc.hosts > 1 else slc.chips
    for tensor in dict.fromkeys((max(layout.mesh[2], 1), 1, 2, 4)):
        if local % tensor:
            continue
        fsdp = local // tensor
        mesh = (slc.chips // (fsdp * tensor), fsdp, tensor)
        for micro in (layout.micro_rows, mesh[0] * fsdp):
            if (mesh, micro) not in out:
                out.append((mesh, micro))
    return out


def _overrides(layout: Layout, slc: Slice, mesh, micro: int) -> list[str]:
    """The ``--set`` lines that turn the config's layout into ``mesh`` / ``micro`` on ``slc``."""
    out = [] if mesh == _resolved(layout, slc) else [
        f"mesh.{k}={v}" for k, v, own in zip(("data", "fsdp", "tensor"), mesh, layout.mesh) if v != own]
    if micro != layout.micro_rows:
        out.append(f"train.micro_batch_rows={micro}")
    return out


def plan_slice(model_config, layout: Layout, slc: Slice, headroom: float = 0.9, host_local: bool = True) -> dict:
    """The first of `_candidates` that runs and fits on ``slc`` (``overrides``: the ``--set`` lines it needs; none
    for the config's own layout), else the smallest plan that runs, ``fits`` False (or only ``reason``);
    ``host_local`` as for `plan_on`."""
    head = {"slice": slc.name, "accelerator_type": slc.accelerator_type, "chips": slc.chips, "hosts": slc.hosts,
            "hbm_gib": slc.hbm_gib}
    best, reasons = None, []
    for mesh, micro in _candidates(layout, slc, host_local):
        plan = plan_on(model_config, layout, slc, mesh, micro, headroom, host_local)
        if "reason" in plan:
            reasons.append(plan["reason"])
            continue
        plan["overrides"] = _overrides(layout, slc, mesh, micro)
        if plan["fits"]:
            return {**head, **plan}
        if best is None or plan["gib_per_device"]["total"] < best["gib_per_device"]["total"]:
            best = plan
    if best is None:
        return {**head, "fits": False, "reason": "; ".join(dict.fromkeys(reasons))}
    return {**head, **best}


def _smallest(rows: list[dict]) -> dict | None:
    """The fitting row of fewest chips (then least HBM), or None."""
    fitting = sorted((r for r in rows if r["fits"]), key=lambda r: (r["chips"], r["hbm_gib"]))
    return fitting[0] if fitting else None


def plan_config(cfg, slices=SLICES, headroom: float = 0.9) -> dict:
    """Plan ``cfg`` (an ExperimentConfig) on every slice of ``slices`` (each `plan_slice`, in ``slices``).

    ``smallest``: the smallest slice it fits (fewest chips, then least HBM; None if none) and
    ``smallest_overrides`` the ``--set`` lines it takes there; ``smallest_as_written``: the smallest it fits with
    no override; ``smallest_per_family``; ``smallest_without_host_limit``: the smallest it would fit if the
    sampler spanned hosts (``host_local=False`` of `plan_on`; today each host samples with a full policy copy).
    """
    model_config, model = config_model(cfg)
    layout = config_layout(cfg)
    rows = [plan_slice(model_config, layout, s, headroom) for s in slices]
    best = _smallest(rows)
    family: dict[str, str] = {}
    for r in sorted((r for r in rows if r["fits"]), key=lambda r: r["chips"]):
        family.setdefault(r["slice"].split("-")[0], r["slice"])
    as_written = _smallest([r for r in rows if r["fits"] and not r["overrides"]])
    unlimited = _smallest([plan_slice(model_config, layout, s, headroom, host_local=False) for s in slices])
    return {"config": cfg.name, "model": model, "num_params": model_config.num_params(),
            "layout": {"mini_batch_rows": layout.mini_rows, "micro_batch_rows": layout.micro_rows,
                       "seq_len": layout.seq_len, "prompt_len": layout.prompt_len, "kv_len": layout.kv_len,
                       "reference_copy": layout.reference, "mesh": list(layout.mesh)},
            "headroom": headroom, "smallest": best and best["slice"],
            "smallest_overrides": best and best["overrides"],
            "smallest_as_written": as_written and as_written["slice"], "smallest_per_family": family,
            "smallest_without_host_limit": unlimited and unlimited["slice"],
            "smallest_without_host_limit_overrides": unlimited and unlimited["overrides"], "slices": rows}


def _run_config(args) -> int:
    from appo_jax.training.config import ConfigError, apply_overrides  # deferred: plan start-up
    from appo_jax.training.config import load_config as load_experiment  # deferred: plan start-up

    try:
        cfg = apply_overrides(load_experiment(args.config), args.set or [])
        out = plan_config(cfg, select_slices(args.slices), args.headroom)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(plan_table(out) if args.table else json.dumps(out))
    return 0


def plan_table(out: dict) -> str:
    """`plan_config`'s result as markdown: the summary, then one line per slice."""
    lines = [f"{out['config']} ({out['model']}, {out['num_params'] / 1e9:.2f}B params): smallest slice "
             f"{out['smallest'] or 'none'} {' '.join('--set ' + o for o in out['smallest_overrides'] or [])}".rstrip(),
             f"without the per-host sampler limit: {out['smallest_without_host_limit'] or 'none'}", "",
             ("| slice | chips x HBM | fits | mesh (data, fsdp, tensor) | micro-batch rows | GiB / device | "
              "--set / why not |"), "|---|---|---|---|---|---|---|"]
    for r in out["slices"]:
        mesh = ", ".join(str(v) for v in r["mesh"].values()) if "mesh" in r else "-"
        gib = r["gib_per_device"]["total"] if "gib_per_device" in r else "-"
        note = r.get("reason") or " ".join(r["overrides"])
        if not r["fits"] and "reason" not in r:
            note = f"over {out['headroom']:.0%} of HBM with the layout that needs least: {note or 'as written'}"
        lines.append(f"| {r['slice']} | {r['chips']} x {r['hbm_gib']:g} GiB | {'yes' if r['fits'] else 'no'} | "
                     f"{mesh} | {r.get('micro_batch_rows', '-')} | {gib} | {note} |")
    return "\n".join(lines)
