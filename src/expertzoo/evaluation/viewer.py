"""Routing viewer: a self-contained HTML page with each token coloured by the experts it was routed to (site
selectable, weights on hover) and a PNG heatmap of expert share per layer. Text is inserted with textContent
and the embedded JSON is escaped for a script element, so no input can run as code."""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import torch

from ..io.atomic import atomic_write_text
from ..zoo import Zoo

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#e377c2", "#8c564b", "#bcbd22",
           "#7f7f7f")
BASE_COLOR = "#bbbbbb"


@torch.no_grad()
def routing_of(zoo: Zoo, text: str, max_len: int = 512) -> dict[str, Any]:
    """Tokens of `text` and, per site, each token's routing weight per expert of the zoo (0 for experts not placed
    there): {tokens, experts, sites: {site: [[w]]}, site_experts: {site: [the experts placed there]}}."""
    tok = zoo.tokenizer
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :max_len]  # [1,S]
    names = zoo.expert_names
    with zoo.trace() as trace:
        zoo(input_ids=ids, attention_mask=torch.ones_like(ids))
    sites: dict[str, list[list[float]]] = {}
    site_experts = {rec["site"]: list(rec.get("experts", names)) for rec in trace.records}
    for rec in trace.records:
        idx, w = rec["indices"], rec["weights"]  # [S,k]
        mass = torch.zeros(idx.shape[0], len(names) + 1)  # last column: the base (BASE slot or all-null)
        real = idx >= 0
        mass.scatter_add_(1, idx.clamp(min=0), w * real)
        mass[:, -1] += (w * (idx == -2)).sum(-1) + (~real.any(-1)).float() * (1 - (w * real).sum(-1)).clamp(min=0)
        sites[rec["site"]] = [[round(float(v), 4) for v in row] for row in mass]
    pieces = [tok.decode([t]) for t in ids[0].tolist()]
    return {"tokens": pieces, "experts": names + ["base"], "sites": sites, "site_experts": site_experts}


def layer_shares(data: dict[str, Any], layers: dict[str, int]) -> tuple[list[int], torch.Tensor]:
    """Expert share per layer [L, E+1], averaged over the layer's sites and tokens."""
    per_layer: dict[int, list[torch.Tensor]] = {}
    for site, rows in data["sites"].items():
        per_layer.setdefault(layers[site], []).append(torch.tensor(rows).mean(0))
    order = sorted(per_layer)
    return order, torch.stack([torch.stack(per_layer[i]).mean(0) for i in order]) if order else torch.zeros(0, 0)


def _script_json(data: Any) -> str:
    """JSON safe inside <script>: no '<', '>' or '&' can close the element or open a comment."""
    return json.dumps(data).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_html(data: dict[str, Any], title: str = "zoo routing") -> str:
    colors = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(data["experts"][:-1])} | {"base": BASE_COLOR}
    return PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", _script_json({**data, "colors": colors}))


def write_png(data: dict[str, Any], layers: dict[str, int], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order, share = layer_shares(data, layers)
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(data["experts"]), 1.0 + 0.25 * max(len(order), 1)))
    im = ax.imshow(share.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(data["experts"])), data["experts"], rotation=45, ha="right")
    ax.set_yticks(range(len(order)), [str(i) for i in order])
    ax.set_ylabel("layer")
    ax.set_title("expert share per layer")
    fig.colorbar(im, ax=ax, label="routing weight")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def write_html(data: dict[str, Any], path: str | Path, title: str = "zoo routing") -> None:
    atomic_write_text(path, render_html(data, title))


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body { font-family: sans-serif; margin: 1.5em; }
#text { font-family: monospace; white-space: pre-wrap; line-height: 1.9; border: 1px solid #ddd; padding: 1em; }
#text span { border-radius: 3px; padding: 1px 0; }
.legend span { display: inline-block; margin-right: 1em; padding: 2px 6px; border-radius: 3px; color: white; }
</style></head>
<body>
<h2 id="heading"></h2>
<label>site <select id="site"></select></label>
<div class="legend" id="legend"></div>
<div id="text"></div>
<script id="zoo-data" type="application/json">__DATA__</script>
<script>
const data = JSON.parse(document.getElementById("zoo-data").textContent);
const sites = Object.keys(data.sites);
const select = document.getElementById("site");
const placed = s => s === "all sites" ? data.experts : [...((data.site_experts || {})[s] || data.experts.slice(0, -1)), "base"];
for (const s of ["all sites", ...sites]) {
  const o = document.createElement("option"); o.value = s;
  o.textContent = s === "all sites" ? s : s + " (" + placed(s).slice(0, -1).join(", ") + ")"; select.appendChild(o);
}
document.getElementById("heading").textContent = document.title;
for (const e of data.experts) {
  const l = document.createElement("span"); l.textContent = e; l.style.background = data.colors[e];
  document.getElementById("legend").appendChild(l);
}
function weightsAt(site, t) {
  const rows = site === "all sites" ? sites.map(s => data.sites[s][t]) : [data.sites[site][t]];
  return data.experts.map((_, e) => rows.reduce((a, r) => a + r[e], 0) / Math.max(rows.length, 1));
}
function render() {
  const box = document.getElementById("text"); box.replaceChildren();
  data.tokens.forEach((piece, t) => {
    const w = weightsAt(select.value, t);
    const top = w.indexOf(Math.max(...w));
    const span = document.createElement("span");
    span.textContent = piece;
    span.dataset.expert = data.experts[top];
    span.style.background = data.colors[data.experts[top]] + Math.round(40 + 160 * w[top]).toString(16).padStart(2, "0");
    const shown = placed(select.value);
    span.title = data.experts.map((e, i) => [e, i]).filter(([e]) => shown.includes(e))
      .map(([e, i]) => e + ": " + w[i].toFixed(3)).join("\\n");
    box.appendChild(span);
  });
}
select.addEventListener("change", render);
render();
</script></body></html>
"""
