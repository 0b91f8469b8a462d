"""A self-contained HTML page showing rollouts token by token: the Branching Score of every generated token
(colour), its entropy / Omega / score (hover), tool observations (grey), and where branches were taken (a
marked token with the branch rollouts listed under their parent with their rewards).

``write_rollout_dump(path, collected, tokenizer)`` takes the :class:`~appo_jax.training.trainer.Collected` of
one iteration. No JavaScript, no external assets: one file that opens anywhere.
"""
from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from appo_jax.core.trajectory import FINISH_NAMES, KIND_BRANCH

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1200px}
.tok{font-family:ui-monospace,monospace;font-size:13px;white-space:pre-wrap;border-radius:2px}
.obs{background:#e6e6e6;color:#555}
.branch{outline:2px solid #d40;outline-offset:1px;font-weight:bold}
.branch::before{content:"\\25BC";color:#d40;font-size:10px}
.row{border:1px solid #ccc;border-radius:6px;padding:.6em;margin:.6em 0}
.meta{font-size:12px;color:#333;margin-bottom:.4em}
.child{margin-left:2em;border-left:3px solid #d40;padding-left:.6em}
.legend span{padding:0 .4em;margin-right:.4em}
"""


def _token_texts(tokenizer, ids) -> list[str]:
    pieces = tokenizer.convert_ids_to_tokens([int(i) for i in ids])
    return [tokenizer.convert_tokens_to_string([p]) if p is not None else "" for p in pieces]


def _colour(score: float, scale: float) -> str:
    """Blue for positive Branching Scores, red for negative, white at 0."""
    x = max(-1.0, min(1.0, score / scale)) if scale > 0 else 0.0
    if x >= 0:
        return f"rgba(40,110,230,{0.08 + 0.6 * x:.2f})"
    return f"rgba(220,60,40,{0.08 + 0.6 * -x:.2f})"


def _row_html(traj, i: int, tokenizer, branching, marks: dict, scale: float, start: int = 0) -> str:
    """Tokens ``start ..`` of row i as spans (a leading ellipsis when ``start`` > 0)."""
    gen = np.asarray(traj.gen_mask[i], bool)
    obs = np.asarray(traj.obs_mask[i], bool)
    length = int((gen | obs).sum())
    ids = np.asarray(traj.tokens[i])[:length]
    texts = _token_texts(tokenizer, ids)
    ent = np.asarray(traj.entropy[i])
    parts = ['<span class="tok obs">&hellip;</span>'] if start > 0 else []
    for t, text in enumerate(texts):
        if t < start:
            continue
        esc = html.escape(text)
        if obs[t]:
            parts.append(f'<span class="tok obs" title="t={t} observation">{esc}</span>')
            continue
        tip = f"t={t} token={int(ids[t])} H={ent[t]:.3f}"
        style = ""
        cls = "tok"
        if branching is not None and i < branching.scores.shape[0]:
            s = float(branching.scores[i, t])
            tip += (f" Omega={branching.omega[i, t]:.4f} BS={s:.3f}"
                    f" candidate={bool(branching.candidates[i, t])} strict={bool(branching.strict[i, t])}")
            if branching.candidates[i, t]:
                style = f' style="background:{_colour(s, scale)}"'
        if (i, t) in marks:
            cls += " branch"
            tip += f" | branched: {', '.join(marks[(i, t)])}"
        parts.append(f'<span class="{cls}"{style} title="{html.escape(tip)}">{esc}</span>')
    return "".join(parts)


def _meta(traj, i: int) -> str:
    kind = "branch" if int(traj.kind[i]) == KIND_BRANCH else "initial"
    extra = ""
    if kind == "branch":
        extra = (f" &middot; parent row {int(traj.parent[i])} &middot; branch after t={int(traj.branch_pos[i])}"
                 f" &middot; score {float(traj.branch_score[i]):.3f}")
    return (f'<div class="meta"><b>row {i}</b> ({kind}) &middot; reward <b>{float(traj.reward[i]):.3f}</b> '
            f'&middot; tool calls {int(traj.tool_calls[i])} &middot; finish '
            f'{FINISH_NAMES[int(traj.finish_reason[i])]}{extra}</div>')


def render_rollout_dump(collected, tokenizer, *, title: str = "rollouts", max_groups: int = 4) -> str:
    """The HTML text of the dump (module doc) for the first ``max_groups`` prompt groups."""
    traj = collected.batch.traj
    branching = collected.branching
    valid = np.asarray(traj.row_valid, bool)
    group = np.asarray(traj.group_id)
    kind = np.asarray(traj.kind)
    parent = np.asarray(traj.parent)
    marks: dict[tuple[int, int], list[str]] = {}
    for j in np.flatnonzero(valid & (kind == KIND_BRANCH)):
        marks.setdefault((int(parent[j]), int(traj.branch_pos[j])), []).append(f"row {j}")
    scale = 1.0
    if branching is not None and branching.candidates.any():
        scale = float(np.abs(branching.scores[branching.candidates]).max()) or 1.0
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
           f"<style>{_CSS}</style></head><body><h2>{html.escape(title)}</h2>",
           '<p class="legend">Generated tokens are coloured by Branching Score '
           '(<span style="background:rgba(40,110,230,.6)">positive</span>'
           '<span style="background:rgba(220,60,40,.6)">negative</span>; uncoloured: not a candidate); '
           '<span class="obs tok">tool observation</span>; <span class="tok branch">branch point</span>. '
           'Hover a token for t, entropy H, Omega and its score.</p>']
    groups = sorted({int(g) for g in group[valid] if g >= 0})[:max_groups]
    for g in groups:
        prompt_row = int(np.flatnonzero(valid & (group == g))[0])
        pmask = np.asarray(traj.prompt_mask[prompt_row], bool)
        prompt = tokenizer.decode(np.asarray(traj.prompt_tokens[prompt_row])[pmask].tolist())
        out.append(f"<h3>prompt group {g}</h3><details><summary>prompt</summary>"
                   f"<pre class='tok'>{html.escape(prompt)}</pre></details>")
        for i in np.flatnonzero(valid & (group == g) & (kind != KIND_BRANCH)):
            out.append(f'<div class="row">{_meta(traj, i)}{_row_html(traj, i, tokenizer, branching, marks, scale)}')
            for j in np.flatnonzero(valid & (kind == KIND_BRANCH) & (parent == i)):
                out.append(f'<div class="child">{_meta(traj, j)}'
                           f'{_row_html(traj, j, tokenizer, None, {}, scale, int(traj.branch_pos[j]) + 1)}</div>')
            out.append("</div>")
    out.append("</body></html>")
    return "\n".join(out)


def write_rollout_dump(path: str | Path, collected, tokenizer, *, title: str = "rollouts", max_groups: int = 4) -> Path:
    """Write :func:`render_rollout_dump` to ``path`` (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_rollout_dump(collected, tokenizer, title=title, max_groups=max_groups), encoding="utf-8")
    return path
