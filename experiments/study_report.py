"""The zoo study's report: gain recovery per router and domain with paired bootstrap 95% intervals (held-out windows
resampled), general-English regression per set, costs, the ablations and the goals, as docs/results/zoo-study.{md,json}
and plots. Reads only the raw measurements that experiments/zoo_study.py caches."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from expertzoo.io.atomic import atomic_write_text

BOOT = 1000
GOALS = {
    "best_router_95": "the best post-hoc router recovers >= 95% of the oracle gain on every domain at N >= 12 with "
                      "general-English regression <= 1.005 on both sets",
    "cheap_router_90": "a router whose routing costs at most 2 rank-16 LoRA experts per token recovers >= 90% on "
                       "every domain",
    "zoo_beats_baselines": "the zoo beats both merges and the multitask LoRA on mean gain",
    "rnd_cost_3x": "the cheap RND costs <= 3x centroid per token",
}


def _nll(m: dict[str, Any], idx: list[int] | None = None) -> float:
    s, c = m["window_nll"], m["window_tokens"]
    if idx is None:
        return sum(s) / max(1, sum(c))
    return sum(s[i] for i in idx) / max(1, sum(c[i] for i in idx))


def _interval(values: list[float]) -> list[float]:
    v = sorted(values)
    return [v[int(0.025 * (len(v) - 1))], v[int(0.975 * (len(v) - 1))]]


def recovery(base: dict, oracle: dict, c: dict, seed: int = 0) -> dict[str, Any]:
    """(B - C) / (B - O) on the same windows, with a paired bootstrap 95% interval."""
    value = (_nll(base) - _nll(c)) / (_nll(base) - _nll(oracle)) if _nll(base) != _nll(oracle) else float("nan")
    rng, n, boots = random.Random(seed), len(base["window_nll"]), []
    for _ in range(BOOT):
        idx = [rng.randrange(n) for _ in range(n)]
        gap = _nll(base, idx) - _nll(oracle, idx)
        if gap:
            boots.append((_nll(base, idx) - _nll(c, idx)) / gap)
    return {"value": value, "ci95": _interval(boots) if boots else [value, value], "nll": _nll(c)}


def ratio(base: dict, c: dict, seed: int = 0) -> dict[str, Any]:
    """NLL(C) / NLL(base) on the same windows, with a paired bootstrap 95% interval."""
    rng, n = random.Random(seed), len(base["window_nll"])
    boots = []
    for _ in range(BOOT):
        idx = [rng.randrange(n) for _ in range(n)]
        boots.append(_nll(c, idx) / _nll(base, idx))
    return {"value": _nll(c) / _nll(base), "ci95": _interval(boots), "nll": _nll(c)}


def contenders(raw: dict[str, Any]) -> dict[str, dict[str, dict]]:
    """Every contender's measurements per set: routers, merges, the multitask LoRA, Co-LLM (per domain's pair)."""
    out: dict[str, dict[str, dict]] = {}
    for r, v in raw["routers"].items():
        if v:
            out[r] = v["sets"]
    for m, v in raw["merges"].items():
        out[f"merge:{m}"] = v
    out["multitask"] = raw["multitask_eval"]
    return out


def summary(raw: dict[str, Any]) -> dict[str, Any]:
    domains = list(raw["oracle"])
    english = [s for s in raw["base"] if s not in domains]
    base, oracle = raw["base"], raw["oracle"]
    lora_site = raw["lora_flops_per_token_per_site"]
    rows: dict[str, Any] = {}
    for name, sets in contenders(raw).items():
        info = raw["routers"].get(name) or {}
        row = {"gain_recovery": {n: recovery(base[n], oracle[n][n], sets[n]) for n in domains},
               "regression": {s: ratio(base[s], sets[s]) for s in english},
               "gain_nats": {n: base[n]["nll"] - sets[n]["nll"] for n in domains},
               "english_base_alone": {s: sets[s].get("base_alone", 0.0) for s in english}}
        if info:
            load = sum(sets[n]["load"] for n in domains) / len(domains)
            row["cost"] = {"router_flops_per_token_per_site": info["flops_per_token_per_site"], "load": load,
                           "flops_per_token_per_site": info["flops_per_token_per_site"] + load * lora_site,
                           "in_lora_experts": (info["flops_per_token_per_site"] + load * lora_site) / lora_site,
                           "fit_s": info["fit_s"]}
        rows[name] = row
    collab = {n: v for n, v in raw["collab"].items() if v}
    if len(collab) == len(domains):
        rows["co-llm"] = {
            "gain_recovery": {n: recovery(base[n], oracle[n][n], collab[n]["sets"][n]) for n in domains},
            "regression": {s: _mean_ratio([ratio(base[s], collab[n]["sets"][s]) for n in domains]) for s in english},
            "gain_nats": {n: base[n]["nll"] - collab[n]["sets"][n]["nll"] for n in domains},
            "english_base_alone": {s: sum(collab[n]["sets"][s]["base_alone"] for n in domains) / len(domains)
                                   for s in english},
            "deferral_rate": {n: collab[n]["sets"][n]["deferral_rate"] for n in domains},
            "cost": {"note": "both whole models run on every token, plus the deferral head",
                     "fit_s": sum(collab[n]["fit_s"] for n in domains)}}
    scaling: dict[str, dict[str, Any]] = {}
    for key, v in raw["scaling"].items():
        if not v:
            continue
        size, r = key.split("/", 1)
        ds = domains[:int(size)]
        rec = {n: recovery(base[n], oracle[n][n], v["sets"][n])["value"] for n in ds}
        scaling.setdefault(r, {})[size] = {"mean_recovery": sum(rec.values()) / len(rec), "min_recovery": min(rec.values()),
                                           "per_domain": rec,
                                           "regression": {s: v["sets"][s]["nll"] / base[s]["nll"] for s in english},
                                           "flops_per_token_per_site": v["flops_per_token_per_site"]}
    kinds: dict[str, Any] = {}
    for key, v in raw["kinds"].items():
        n, kind = key.split("/")
        e = raw["experts"][key]
        kinds[key] = {"kind": kind, "domain": n, "gain_nats": base[n]["nll"] - v[n]["nll"],
                      "parameters": e["parameters"], "flops_per_token": e["flops_per_token"],
                      "forced_regression": {s: v[s]["nll"] / base[s]["nll"] for s in english}}
    for n in {k.split("/")[0] for k in raw["kinds"]}:
        e = raw["experts"][f"{n}/lora"]
        kinds[f"{n}/lora"] = {"kind": "lora", "domain": n, "gain_nats": base[n]["nll"] - oracle[n][n]["nll"],
                              "parameters": e["parameters"], "flops_per_token": e["flops_per_token"],
                              "forced_regression": {s: oracle[n][s]["nll"] / base[s]["nll"] for s in english}}
    forced_harm = {n: {s: oracle[n][s]["nll"] / base[s]["nll"] for s in english} for n in domains}
    return {"domains": domains, "english_sets": english, "routers": rows, "scaling": scaling, "kinds": kinds,
            "forced_harm": forced_harm, "oracle_gain_nats": {n: base[n]["nll"] - oracle[n][n]["nll"] for n in domains},
            "lora_flops_per_token_per_site": lora_site}


def gain_difference(raw: dict[str, Any], a: str, b: str, domains: list[str], seed: int = 0) -> dict[str, Any]:
    """Mean over domains of (gain of contender a - gain of contender b) in nats, with a 95% interval from a paired
    bootstrap that resamples each domain's held-out windows."""
    sets = contenders(raw)
    diff = lambda n, idx: _nll(sets[b][n], idx) - _nll(sets[a][n], idx)  # noqa: E731  (base cancels out)
    value = sum(diff(n, None) for n in domains) / len(domains)
    rng, boots = random.Random(seed), []
    for _ in range(BOOT):
        total = 0.0
        for n in domains:
            k = len(sets[a][n]["window_nll"])
            total += diff(n, [rng.randrange(k) for _ in range(k)])
        boots.append(total / len(domains))
    return {"value": value, "ci95": _interval(boots)}


def _mean_ratio(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"value": sum(i["value"] for i in items) / len(items),
            "ci95": [sum(i["ci95"][0] for i in items) / len(items), sum(i["ci95"][1] for i in items) / len(items)],
            "worst": max(i["value"] for i in items)}


class Measures:
    """Per contender of a summary: worst-domain and mean gain recovery, worst general-English regression, mean gain
    in nats, routing FLOPs per token and site."""

    def __init__(self, s: dict[str, Any]):
        self.rows, self.domains, self.english = s["routers"], s["domains"], s["english_sets"]

    def worst(self, r: str) -> float:
        return min(self.rows[r]["gain_recovery"][n]["value"] for n in self.domains)

    def mean(self, r: str) -> float:
        return sum(self.rows[r]["gain_recovery"][n]["value"] for n in self.domains) / len(self.domains)

    def regr(self, r: str) -> float:
        return max(self.rows[r]["regression"][x]["value"] for x in self.english)

    def gain(self, r: str) -> float:
        return sum(self.rows[r]["gain_nats"].values()) / len(self.domains)

    def cost(self, r: str) -> int:
        return self.rows[r]["cost"]["router_flops_per_token_per_site"]


def routed(s: dict[str, Any], raw: dict[str, Any]) -> list[str]:
    """The post-hoc routers the goals are about: every fitted router kind over all N experts. Not uniform (no
    routing), the merges or the multitask LoRA (baselines), nor Co-LLM: each of its pairs is the base and the
    domain's own expert, so it is told the domain (an oracle's choice of expert with a learned deferral)."""
    return [r for r in s["routers"] if raw["routers"].get(r) and r != "uniform"]


def reading(s: dict[str, Any], raw: dict[str, Any]) -> list[str]:
    """What the tables say, in sentences computed from them (so a rerun cannot leave them stale)."""
    rows, d, e = s["routers"], s["domains"], s["english_sets"]
    routers = routed(s, raw)
    if not routers:
        return []
    m = Measures(s)
    worst, mean, regr, gain = m.worst, m.mean, m.regr, m.gain
    by_worst, by_mean = max(routers, key=worst), max(routers, key=mean)
    oracle = sum(s["oracle_gain_nats"].values()) / len(d)
    near = [r for r in routers if worst(r) >= 0.95]
    best_gain = max(routers, key=gain)
    w = min(d, key=lambda n: rows[by_worst]["gain_recovery"][n]["value"])
    lo = rows[by_worst]["gain_recovery"][w]["ci95"][0]
    ties = [r for r in routers if r != by_worst and worst(r) >= lo]  # inside the best's interval on its worst domain
    out = [f"- **Routing.** With {len(d)} experts, {len(near)} of {len(routers)} post-hoc routers recover 95% of the "
           f"oracle's gain on every domain; the best by worst domain is {by_worst} ({worst(by_worst):.0%} worst, "
           f"{mean(by_worst):.0%} mean" + (f"; within its interval on {w}: {', '.join(ties)}" if ties else "")
           + f"), the best by mean is {by_mean} ({mean(by_mean):.0%} mean, "
           f"{worst(by_mean):.0%} worst). Mean gain: oracle {oracle:.3f} nats, best router {best_gain} "
           f"{gain(best_gain):.3f}."]
    kept = [r for r in routers if regr(r) <= 1.005]
    english = [f"{len(kept)} of {len(routers)} routers keep both English sets within 1.005 of the base"
               + (f" (worst of them {max(regr(r) for r in kept):.4f})" if kept else "")]
    if "multitask" in rows:
        mt = rows["multitask"]
        beats = sum(mt["gain_recovery"][n]["value"] > 1 for n in d)
        english.append(f"the multitask LoRA gains more than the oracle on {beats} of {len(d)} domains (mean "
                       f"{gain('multitask'):.3f} nats), its general-English regression "
                       + ", ".join(f"{x} {mt['regression'][x]['value']:.4f}" for x in e))
    out.append("- **General English.** " + "; ".join(english) + ".")
    if "uniform" in rows and "merge:linear" in rows:
        diff = max(abs(rows["uniform"]["gain_nats"][n] - rows["merge:linear"]["gain_nats"][n]) for n in d)
        out.append(f"- **Check.** The uniform router and the linear merge agree to {diff:.1e} nats on every domain, as "
                   "they must: LoRA is linear in its delta, so equal weights on all experts are the mean delta.")
    if "co-llm" in rows:
        c = rows["co-llm"]
        out.append("- **Co-LLM** (per domain, the base and that domain's expert) recovers "
                   f"{min(v['value'] for v in c['gain_recovery'].values()):.0%}+ of the oracle but is told the domain, "
                   "so it is not among the routers above. Its deferral head is trained on its domain only and sends "
                   + ", ".join(f"{1 - c['english_base_alone'][x]:.0%} of {x}" for x in e)
                   + " tokens to the expert (means over the domains' pairs; regression "
                   + ", ".join(f"{x} {c['regression'][x]['value']:.4f} (worst pair {c['regression'][x]['worst']:.4f})"
                               for x in e) + ").")
    lowrank = [r for r in routers if r.startswith("rnd_lowrank")]
    if lowrank and "centroid" in rows:
        out.append("- **The cheap RND.** " + "; ".join(
            f"{r}: {mean(r):.0%} mean, {worst(r):.0%} worst, {m.cost(r) / m.cost('centroid'):.2f}x centroid's routing "
            "cost" for r in lowrank)
            + (f"; centroid {mean('centroid'):.0%} mean, {worst('centroid'):.0%} worst" if "centroid" in routers else "")
            + (f"; rnd {mean('rnd'):.0%} mean, {worst('rnd'):.0%} worst" if "rnd" in routers else "") + ".")
    sc = s["scaling"]
    if sc:
        parts, common = [], None
        for r, v in sc.items():
            sizes = sorted(v, key=int)
            first, last = v[sizes[0]]["mean_recovery"], v[sizes[-1]]["mean_recovery"]
            parts.append(f"{r} {first:.0%} at N={sizes[0]} to {last:.0%} at N={sizes[-1]}")
            common = common or list(v[sizes[0]]["per_domain"])
        same = []
        for r, v in sc.items():  # the domains every zoo holds, so that only N changes
            means = [sum(v[k]["per_domain"][n] for n in common) / len(common) for k in sorted(v, key=int)
                     if all(n in v[k]["per_domain"] for n in common)]
            same.append(f"{r} " + " / ".join(f"{m:.0%}" for m in means))
        sizes = sorted({k for v in sc.values() for k in v}, key=int)
        out.append("- **Number of experts.** Mean recovery over each zoo's own domains: " + "; ".join(parts)
                   + f". On the domains every zoo holds ({', '.join(common)}), at N = {' / '.join(sizes)}: "
                   + "; ".join(same) + ".")
    if s["kinds"]:
        doms = sorted({v["domain"] for v in s["kinds"].values()})
        of = {n: [v for v in s["kinds"].values() if v["domain"] == n] for n in doms}
        best = {n: max(of[n], key=lambda v: v["gain_nats"]) for n in doms}
        harm = {n: max(of[n], key=lambda v: max(v["forced_regression"].values())) for n in doms}
        out.append("- **Expert type.** Largest gain: "
                   + "; ".join(f"{n} {b['kind']} {b['gain_nats']:+.3f}" for n, b in best.items())
                   + ". Highest general-English regression when forced (below 1: English improves): "
                   + "; ".join(f"{n} {h['kind']} {max(h['forced_regression'].values()):.4f}" for n, h in harm.items())
                   + ".")
    return out


def goals(s: dict[str, Any], raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    rows, domains = s["routers"], s["domains"]
    post_hoc = routed(s, raw)
    m = Measures(s)
    worst, mean, regr, mean_gain, cost = m.worst, m.mean, m.regr, m.gain, m.cost
    out: dict[str, dict[str, Any]] = {}
    if post_hoc:
        # the goal holds if any router meets both conditions: the best by worst domain among those that keep English
        best = max([r for r in post_hoc if regr(r) <= 1.005] or post_hoc, key=worst)
        w = min(domains, key=lambda n: rows[best]["gain_recovery"][n]["value"])
        ci = rows[best]["gain_recovery"][w]["ci95"]
        out["best_router_95"] = {
            "goal": GOALS["best_router_95"],
            "measured": f"{best}: worst domain {w} {worst(best):.1%} [{ci[0]:.1%}, {ci[1]:.1%}], regression "
                        + ", ".join(f"{e} {rows[best]['regression'][e]['value']:.4f}" for e in s["english_sets"])
                        + f" at N={len(domains)}",
            "met": bool(len(domains) >= 12 and worst(best) >= 0.95 and regr(best) <= 1.005)}
        lora = s["lora_flops_per_token_per_site"]
        cheap = [r for r in post_hoc if "router_flops_per_token_per_site" in rows[r].get("cost", {})
                 and cost(r) <= 2 * lora]
        if cheap:
            b = max(cheap, key=worst)
            out["cheap_router_90"] = {
                "goal": GOALS["cheap_router_90"],
                "measured": f"{b} (routing costs {rows[b]['cost']['router_flops_per_token_per_site'] / lora:.2f} LoRA "
                            f"experts per token and site): worst-domain recovery {worst(b):.1%}; routers within the "
                            f"cost: {', '.join(cheap)}",
                "met": bool(worst(b) >= 0.9)}
        zoo_best = max(post_hoc, key=mean_gain)
        others = {k: mean_gain(k) for k in ("merge:linear", "merge:ties", "multitask") if k in rows}
        gap = ""
        if others and "base" in raw:
            rival = max(others, key=others.get)
            d = gain_difference(raw, zoo_best, rival, domains)
            gap = f"; {zoo_best} - {rival} {d['value']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]"
        out["zoo_beats_baselines"] = {
            "goal": GOALS["zoo_beats_baselines"],
            "measured": f"mean gain (nats): {zoo_best} {mean_gain(zoo_best):.4f}; "
                        + ", ".join(f"{k} {v:.4f}" for k, v in others.items()) + gap,
            "met": bool(len(others) == 3 and mean_gain(zoo_best) > max(others.values()))}
    if "rnd_lowrank" in rows and "centroid" in rows:
        c = cost("centroid")
        variants = [r for r in rows if r.startswith("rnd_lowrank:") and "cost" in rows[r]]
        out["rnd_cost_3x"] = {"goal": GOALS["rnd_cost_3x"],
                              "measured": f"rnd_lowrank routing {cost('rnd_lowrank'):,} FLOPs/token/site = "
                                          f"{cost('rnd_lowrank') / c:.2f}x centroid ({c:,}), recovering "
                                          f"{mean('rnd_lowrank'):.0%} mean, {worst('rnd_lowrank'):.0%} worst"
                                          + "".join(f"; {r} {cost(r) / c:.2f}x, {mean(r):.0%} mean" for r in variants)
                                          + (f"; rnd {cost('rnd'):,}" if "cost" in rows.get("rnd", {}) else ""),
                              "met": bool(cost("rnd_lowrank") <= 3 * c)}
    return out


def plots(s: dict[str, Any], out: Path, stem: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    if s["scaling"]:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
        for r, rows in s["scaling"].items():
            sizes = sorted(rows, key=int)
            for ax, key in zip(axes, ("mean_recovery", "min_recovery")):
                ax.plot([int(n) for n in sizes], [rows[n][key] for n in sizes], marker="o", label=r)
        axes[0].set(xlabel="trained experts in the zoo (N)", ylabel="gain recovery", title="Mean over the zoo's domains")
        axes[1].set(xlabel="trained experts in the zoo (N)", title="Worst domain")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"{stem}-scaling.png", dpi=120)
        plt.close(fig)
        files.append(f"{stem}-scaling.png")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r, row in s["routers"].items():
        rec = sum(v["value"] for v in row["gain_recovery"].values()) / len(row["gain_recovery"])
        reg = max(v["value"] for v in row["regression"].values()) if row["regression"] else 1.0
        ax.scatter(reg, rec)
        ax.annotate(r, (reg, rec), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.axvline(1.005, color="grey", ls=":")
    ax.axhline(0.95, color="grey", ls=":")
    ax.set(xlabel="worst general-English regression (NLL / base)", ylabel="mean gain recovery",
           title="Task gain against general English")
    fig.tight_layout()
    fig.savefig(out / f"{stem}-tradeoff.png", dpi=120)
    plt.close(fig)
    files.append(f"{stem}-tradeoff.png")
    return files


def markdown(s: dict[str, Any], raw: dict[str, Any], settings: dict[str, Any], g: dict, files: list[str]) -> str:
    d, e = s["domains"], s["english_sets"]
    pct = lambda v: f"{v['value']:.0%} [{v['ci95'][0]:.0%}, {v['ci95'][1]:.0%}]"  # noqa: E731
    st = settings
    lines = [f"# The zoo study: {len(d)} trained domains on {st['base']}" + (" (smoke run: tiny model)"
                                                                              if st["profile"] == "smoke" else ""), "",
             f"Command: `{st['command']}`; {st['wall_s'] / 60:.0f} min in its last invocation, "
             f"{sum(st['step_seconds'].values()) / 60:.0f} min summed over the cached steps; "
             + ", ".join(f"{k} {v}" for k, v in st["machine"].items() if v) + ".", "",
             f"**Set-up.** Experts at the MLP blocks of layers {st['layers']}, trained from the cached frozen prefix "
             f"(layers below computed once per domain). LoRA rank {st['rank']} per domain, batches of {st['batch']} x "
             f"{st['max_len']} tokens, held-out NLL on {st['val_windows']} validation windows every "
             f"{st['check_every']} steps; stop when it is flat within 1% over the last fifth of training "
             f"(at least {st['min_steps']} steps) or at {st['max_steps']} steps. Evaluation: at least "
             f"{st['eval_tokens']:,} scored held-out tokens per set; 95% intervals from a paired bootstrap over "
             f"held-out windows ({BOOT} resamples). Gain recovery = (NLL_base - NLL) / (NLL_base - NLL_oracle), the "
             "oracle being the domain's own expert forced. Regression = NLL / NLL_base on a general-English set.", "",
             "## Domains", "", "| domain | train tokens (est.) | held-out tokens (est.) | scored eval tokens | "
             "expert steps | plateau | base NLL | oracle NLL | oracle gain |", "|---|---|---|---|---|---|---|---|---|"]
    for n in d + e:
        c = raw["data"][n]
        ex = raw["experts"].get(f"{n}/lora")
        lines.append(f"| {n} | {c['train_tokens_est']:,} | {c['test_tokens_est']:,} | {c['eval_tokens']:,} | "
                     + (f"{ex['steps']} | {'yes' if ex['plateau'] else 'no'} | {raw['base'][n]['nll']:.3f} | "
                        f"{raw['oracle'][n][n]['nll']:.3f} | {s['oracle_gain_nats'][n]:+.3f} |" if ex else
                        f"(general English) | | {raw['base'][n]['nll']:.3f} | | |"))
    lines += ["", f"## Routing mechanism (N = {len(d)}, LoRA experts, top-2 unless the kind decides)", "",
              "| contender | " + " | ".join(d) + " | " + " | ".join(f"{x} regr." for x in e)
              + " | English to base alone | routing FLOPs/token/site | total cost (LoRA experts) | fit s |", "|---|" + "---|" * (len(d) + len(e) + 4)]
    for r, row in s["routers"].items():
        cost = row.get("cost", {})
        lines.append(f"| {r} | " + " | ".join(pct(row["gain_recovery"][n]) for n in d) + " | "
                     + " | ".join(f"{row['regression'][x]['value']:.4f} [{row['regression'][x]['ci95'][0]:.4f}, "
                                  f"{row['regression'][x]['ci95'][1]:.4f}]" for x in e) + " | "
                     + ", ".join(f"{row['english_base_alone'][x]:.0%}" for x in e) + " | "
                     + (f"{cost['router_flops_per_token_per_site']:,}" if "router_flops_per_token_per_site" in cost
                        else "") + " | "
                     + (f"{cost['in_lora_experts']:.2f}" if "in_lora_experts" in cost else cost.get("note", "")) + " | "
                     + (f"{cost['fit_s']:.0f}" if "fit_s" in cost else "") + " |")
    lines += ["", f"Total cost = (routing FLOPs + load x a rank-{st['rank']} LoRA expert's FLOPs) per token per site, "
              f"in units of one LoRA expert ({s['lora_flops_per_token_per_site']:,} FLOPs/token/site). Co-LLM pairs the base with the "
              "zoo forced to the domain's expert (one head per domain; it is told the domain, so the goals leave it out); "
              "its English regression is the mean over the domains' pairs.", "", "## Number of experts", "",
              "| router | " + " | ".join(f"N={n} mean / worst recovery" for n in sorted(
                  {k for v in s["scaling"].values() for k in v}, key=int)) + " |",
              "|---|" + "---|" * len({k for v in s["scaling"].values() for k in v})]
    sizes = sorted({k for v in s["scaling"].values() for k in v}, key=int)
    for r, rows in s["scaling"].items():
        lines.append(f"| {r} | " + " | ".join(
            f"{rows[n]['mean_recovery']:.0%} / {rows[n]['min_recovery']:.0%} (regr. "
            + ", ".join(f"{v:.3f}" for v in rows[n]["regression"].values()) + ")" if n in rows else "" for n in sizes)
            + " |")
    lines += ["", "## Expert type", "", "| domain | kind | parameters | FLOPs/token | gain (nats) | "
              + " | ".join(f"{x} regression when forced" for x in e) + " |", "|---|---|---|---|---|" + "---|" * len(e)]
    for k, v in sorted(s["kinds"].items()):
        lines.append(f"| {v['domain']} | {v['kind']} | {v['parameters']:,} | {v['flops_per_token']:,} | "
                     f"{v['gain_nats']:+.4f} | " + " | ".join(f"{v['forced_regression'][x]:.4f}" for x in e) + " |")
    lines += ["", "## Harm of each LoRA expert forced on general English", "",
              "| expert | " + " | ".join(e) + " |", "|---|" + "---|" * len(e)]
    for n, h in s["forced_harm"].items():
        lines.append(f"| {n} | " + " | ".join(f"{h[x]:.4f}" for x in e) + " |")
    mt = raw["multitask"]
    lines += ["", f"Multitask baseline: one LoRA of rank {mt['rank']} on the union of the training data for "
              f"{mt['steps']} steps (the experts' total). Merges: mean of the LoRA deltas (linear) and TIES "
              f"(density {st['ties_density']})."]
    if raw.get("gsm8k"):
        lines += ["", "## GSM8K exact match (lm-eval task gsm8k_zoo, greedy, zero-shot, the evaluation half)", "",
                  "| model | problems | exact match (strict) ± s.e. | exact match (flexible) ± s.e. |", "|---|---|---|---|"]
        for k, v in raw["gsm8k"].items():
            name = {"base": "base", "math": "math expert forced"}.get(k, f"zoo ({v.get('router')})")
            em = lambda f: (f"{v.get(f'exact_match/{f}', float('nan')):.3f} ± "  # noqa: E731
                            f"{v.get(f'exact_match_stderr/{f}', float('nan')):.3f}")
            lines.append(f"| {name} | {v['problems']} | {em('strict-match')} | {em('flexible-extract')} |")
    lines += ["", "## Reading", ""] + reading(s, raw)
    lines += ["", "## Goals", ""]
    for name, v in g.items():
        lines.append(f"- **{name}** ({v['goal']}): {v['measured']} — **{'met' if v['met'] else 'missed'}**")
    lines += ["", "Plots: " + ", ".join(f"[{f}]({f})" for f in files), ""]
    return "\n".join(lines) + "\n"


def write(raw: dict[str, Any], settings: dict[str, Any], out: Path, profile: str = "full") -> dict[str, Any]:
    """Write zoo-study.{md,json} (zoo-study-smoke.* for the smoke profile) and the plots into `out`."""
    stem = "zoo-study" if profile == "full" else "zoo-study-smoke"
    out.mkdir(parents=True, exist_ok=True)
    s = summary(raw)
    g = goals(s, raw)
    files = plots(s, out, stem)
    doc = {"domains": s["domains"], "english_sets": s["english_sets"], "routers": s["routers"],
           "scaling": s["scaling"], "kinds": s["kinds"], "forced_harm": s["forced_harm"], "goals": g,
           "gsm8k": raw.get("gsm8k"),
           "settings": settings, "data": raw["data"],
           "experts": {k: {f: v.get(f) for f in ("kind", "steps", "plateau", "parameters", "flops_per_token", "seconds")}
                       for k, v in raw["experts"].items()}}
    atomic_write_text(out / f"{stem}.json", json.dumps(doc, indent=1, sort_keys=True) + "\n")
    atomic_write_text(out / f"{stem}.md", markdown(s, raw, settings, g, files))
    print(f"wrote {out / stem}.md and .json")
    return doc
