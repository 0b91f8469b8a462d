"""The paper's Tables 1-4 with our numbers beside the published ones (docs/paper_tables.md).

    python experiments/paper/tables.py --results results --out tables
    python experiments/paper/tables.py --smoke --out /tmp/tables_smoke

``--results DIR`` holds one ``appo-jax eval --out`` directory per row: ``DIR/<table>/<row>/``, e.g.
``results/table1/qwen2.5-7b,appo`` (row keys and the column mapping: `experiments/paper/tables_mapping.py`).
Writes ``OUT/table1.md``, ``table1.csv``, ``table1.tex`` ... ``table4.*`` and ``table2_passk.*`` (the pass@k
numbers of the paper's text): every published row, each cell ``ours / paper (ours - paper)``, missing numbers
marked, and under each table where every row's numbers came from (model_id, judge, runs). A bad results directory
(unknown table or row, mixed model_ids / judges / samplings in one row) is refused with a message naming it.

``--smoke`` builds the four tables end to end from a random ``tiny-llama`` (tokenizer ``smollm2-135m-instruct``):
2 questions of every benchmark the tables use, 1 run, 64-token responses, the rule judge, evaluated once into
``OUT/smoke_eval`` and copied (each table's benchmarks) into ``OUT/smoke_results/<table>/<APPO row>/``, then
tabulated into OUT like ``--results OUT/smoke_results``; the other rows are present with their cells missing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tables_mapping import TablesError, table_specs  # noqa: E402
from tables_render import write_table  # noqa: E402
from tables_results import build_tables, shipped_breakdowns  # noqa: E402

#: the row each table's smoke results fill (the APPO row; Table 3's APPO default budget N4_B3)
SMOKE_ROWS = {"table1": "qwen2.5-7b,appo", "table2": "qwen3-8b,appo", "table3": "N4_B3", "table4": "qwen2.5-7b,appo"}
SMOKE_MODEL, SMOKE_TOKENIZER = "tiny-llama", "smollm2-135m-instruct"
SMOKE_QUESTIONS, SMOKE_RESPONSE_LEN = 2, 64


def write_tables(results_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Tabulate ``results_dir`` into ``out_dir`` (module doc); returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for table in build_tables(results_dir).values():
        paths += write_table(table, out)
    return paths


def copy_answers(src: Path, dst: Path, benchmarks: list[str]) -> None:
    """``dst``: an eval directory holding ``src``'s settings and its answers of ``benchmarks``, with their
    summary (as ``appo-jax eval --out`` writes it)."""
    from appo_jax.evaluation.metrics import summarize
    from appo_jax.evaluation.runner import SUMMARY_JSON, SUMMARY_MD, summary_markdown

    dst.mkdir(parents=True, exist_ok=True)
    settings = (src / "settings.json").read_text(encoding="utf-8")
    (dst / "settings.json").write_text(settings, encoding="utf-8")
    lines = [line for line in (src / "answers.jsonl").read_text(encoding="utf-8").splitlines()
             if line.strip() and json.loads(line)["benchmark"] in benchmarks]
    (dst / "answers.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    rows = [json.loads(line) for line in lines]
    summary = {"benchmarks": summarize(rows, {b: shipped_breakdowns(b) for b in benchmarks}),
               "settings": json.loads(settings), "sampled": 0, "answers_file": str(dst / "answers.jsonl")}
    (dst / SUMMARY_JSON).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    (dst / SUMMARY_MD).write_text(summary_markdown(summary) + "\n", encoding="utf-8")


def run_smoke(out_dir: str | Path) -> Path:
    """Evaluate the random tiny model once on every benchmark the tables use and lay the answers out as
    ``OUT/smoke_results/<table>/<row>/`` (module doc); returns that results directory."""
    from appo_jax.evaluation.runner import EvalSpec, evaluate_to_dir
    from appo_jax.rewards.judge import make_judge
    from appo_jax.rollout.config import RolloutConfig
    from appo_jax.rollout.engine import default_tools
    from appo_jax.training.policy_source import resolve_policy

    out = Path(out_dir)
    specs = table_specs()
    benchmarks = sorted({b for table in SMOKE_ROWS for b in specs[table].benchmarks()})
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    policy = resolve_policy(SMOKE_MODEL, SMOKE_TOKENIZER)
    rollout = RolloutConfig(max_prompt_len=2048, max_response_len=SMOKE_RESPONSE_LEN, tool_call_limit=3, num_slots=32)
    spec = EvalSpec(benchmarks, runs=1, limit=SMOKE_QUESTIONS, rollout=rollout)
    with default_tools(spec.engine_config()) as tools:
        evaluate_to_dir(policy, spec, out / "smoke_eval", make_judge("rule"), tools, log=log, progress=False)
    results = out / "smoke_results"
    for table, row in SMOKE_ROWS.items():
        copy_answers(out / "smoke_eval", results / table / row, specs[table].benchmarks())
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The paper's Tables 1-4 with our numbers beside the published "
                                                 "ones (docs/paper_tables.md).")
    parser.add_argument("--results", help="results directory: DIR/<table>/<row>/ = one `appo-jax eval --out` "
                                          "directory per row, e.g. DIR/table1/qwen2.5-7b,appo")
    parser.add_argument("--out", required=True, help="where table1.md/.csv/.tex ... table4.* are written")
    parser.add_argument("--smoke", action="store_true",
                        help="evaluate a random tiny model on 2 questions per benchmark into OUT/smoke_results "
                             "and tabulate that (an end-to-end check, minutes on a CPU)")
    args = parser.parse_args(argv)
    if args.smoke == bool(args.results):
        parser.error("give either --results DIR or --smoke")
    try:
        results = run_smoke(args.out) if args.smoke else Path(args.results)
        paths = write_tables(results, args.out)
    except TablesError as err:
        print(f"tables.py: error: {err}", file=sys.stderr)
        return 2
    print("\n".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
