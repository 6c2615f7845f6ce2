"""``megafusion quickstart --seeds 0,1,2``: the quickstart and its comparisons at several data
seeds, summarised as mean and spread per variant, with each comparison called a finding only
where its gap exceeds the seed spread.

Each seed is a whole quickstart under ``OUT/seedS`` (data, runs, evaluations, report); a seed
whose folder holds a finished report made with the same options is reused, one made with other
options is refused. The summary: ``OUT/seeds.md`` and ``OUT/seeds.json``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

# Options that make one seed's results comparable with another's: everything the quickstart
# is run with except where (--out), which seed (--seed) and which RAE file (shared by seeds).
OPTIONS = ("quick", "full", "compare", "steps", "device", "world", "holdout", "overrides", "cfg", "shift",
           "frame_shift")
EVALUATIONS = ("generation", "captioning", "vqa", "world_model", "planning", "perplexity")


class SeedsError(ValueError):
    """A seed folder that cannot be reused or summarised (the message names it and the fix)."""


def seed_dir(out: Path, seed: int) -> Path:
    return out / f"seed{seed}"


def options_record(args) -> dict:
    """The quickstart options that a seed's results depend on (argparse namespace -> dict)."""
    return {k: getattr(args, k) for k in OPTIONS}


def finished(folder: Path, options: dict) -> bool:
    """Whether ``folder`` holds a finished quickstart made with ``options`` (then it is reused).
    SeedsError when it holds one made with other options: mixing them would compare unlike runs."""
    record = folder / "options.json"
    if not record.is_file():
        return False  # not started, or interrupted: the quickstart resumes it
    made = json.loads(record.read_text())
    if made != options:
        changed = sorted(k for k in set(made) | set(options) if made.get(k) != options.get(k))
        raise SeedsError(f"{folder} was made with other options ({', '.join(f'{k}: {made.get(k)!r}' for k in changed)}"
                         f"); pass the same options, another --out, or remove {folder}")
    return (folder / "report.md").is_file()


def _stats(values: list[float]) -> dict:
    return {"values": values, "mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "sd": statistics.stdev(values) if len(values) > 1 else None}


def collect(out: Path, seeds: list[int], trends: list[str], variants: dict[str, list]) -> dict:
    """{trend: {variant: {evaluation: {"seen": stats, "unseen": stats, "metric", "higher_is_better"}}}}
    from ``OUT/seedS/<variant folder>/eval/metrics.json``; ``variants[trend]`` lists the
    trend's (name, folder relative to a seed folder) pairs."""
    table: dict = {}
    for trend in trends:
        table[trend] = {}
        for name, folder in variants[trend]:
            per_eval: dict = {}
            for seed in seeds:
                metrics = seed_dir(out, seed) / folder / "eval" / "metrics.json"
                if not metrics.is_file():
                    raise SeedsError(f"{metrics} is missing: seed {seed}'s {trend}/{name} run was not evaluated; "
                                     "run the same command again to finish it")
                heads = json.loads(metrics.read_text())["headlines"]
                for e in EVALUATIONS:
                    if e not in heads:
                        continue
                    h = per_eval.setdefault(e, {"metric": heads[e]["metric"], "chance": heads[e]["chance"],
                                                "higher_is_better": heads[e].get("higher_is_better", True),
                                                "seen": [], "unseen": []})
                    h["seen"].append(heads[e]["value"])
                    if heads[e].get("value_unseen") is not None:
                        h["unseen"].append(heads[e]["value_unseen"])
            for h in per_eval.values():
                h["seen"] = _stats(h["seen"])
                h["unseen"] = _stats(h["unseen"]) if len(h["unseen"]) == len(seeds) else None
            table[trend][name] = per_eval
    return table


def compare(a: dict, b: dict) -> dict:
    """Variant b against variant a on one evaluation split (their ``_stats``): the gap of the
    means (b - a), the seed spread (the larger of the two ranges, max - min over seeds) and
    whether the gap exceeds it (a finding; never with one seed)."""
    gap = b["mean"] - a["mean"]
    spread = max(a["max"] - a["min"], b["max"] - b["min"])
    return {"gap": gap, "spread": spread, "finding": len(a["values"]) > 1 and abs(gap) > spread}


def _cell(s: dict | None) -> str:
    if s is None:
        return "-"
    return f"{s['mean']:.3g}" + (f" ± {s['sd']:.2g}" if s["sd"] is not None else "")


def summary_lines(table: dict, seeds: list[int], descriptions: dict[str, str]) -> list[str]:
    """Markdown: per trend, mean ± standard deviation over seeds (seen; unseen in brackets), then
    each variant against the trend's first one: gap, spread and whether it is a finding."""
    lines = [f"# megafusion quickstart at seeds {', '.join(map(str, seeds))}", "",
             "Each cell: mean ± standard deviation over the seeds, on the seen split (the unseen split's in "
             "brackets). A comparison is a *finding* only where the gap between the means exceeds the seed "
             "spread (the larger of the two variants' ranges, max - min over seeds)."]
    for trend, variants in table.items():
        evals = [e for e in EVALUATIONS if any(e in v for v in variants.values())]
        metric = {e: next(v[e]["metric"] for v in variants.values() if e in v) for e in evals}
        lines += ["", f"## {trend}", "", descriptions.get(trend, ""), "",
                  "| variant | " + " | ".join(f"{e} ({metric[e]})" for e in evals) + " |",
                  "|---|" + "---|" * len(evals)]
        for name, per_eval in variants.items():
            lines.append(f"| {name} | " + " | ".join(
                (_cell(per_eval[e]["seen"]) + (f" ({_cell(per_eval[e]['unseen'])})" if per_eval[e]["unseen"] else ""))
                if e in per_eval else "-" for e in evals) + " |")
        names = list(variants)
        base = names[0]
        for name in names[1:]:
            lines += ["", f"{name} against {base}:", "", "| evaluation | split | gap | seed spread | verdict |",
                      "|---|---|---|---|---|"]
            for e in evals:
                if e not in variants[base] or e not in variants[name]:
                    continue
                for split in ("seen", "unseen"):
                    a, b = variants[base][e][split], variants[name][e][split]
                    if a is None or b is None:
                        continue
                    c = compare(a, b)
                    better = (c["gap"] > 0) == variants[base][e]["higher_is_better"]
                    verdict = (f"finding: {name} {'better' if better else 'worse'}" if c["finding"]
                               else "one seed: no verdict" if len(a["values"]) < 2 else "within the seed spread")
                    lines.append(f"| {e} | {split} | {c['gap']:+.3g} | {c['spread']:.3g} | {verdict} |")
    return lines


def summarize(out: Path, seeds: list[int], trends: list[str], variants: dict[str, list],
              descriptions: dict[str, str]) -> Path:
    """Writes ``OUT/seeds.md`` and ``OUT/seeds.json`` (the table with every seed's values)."""
    table = collect(out, seeds, trends, variants)
    (out / "seeds.json").write_text(json.dumps({"seeds": seeds, "trends": table}, indent=1) + "\n")
    report = out / "seeds.md"
    report.write_text("\n".join(summary_lines(table, seeds, descriptions)) + "\n")
    return report
