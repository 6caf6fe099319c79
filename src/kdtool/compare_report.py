"""The report side of ``kdtool compare``: aggregate runs over training seeds, pair each objective
with the baseline seed by seed, and write the table (Markdown, terminal) and the plots.

Paired differences: for objective o and training seed s, Δ_s = m(o, s) − m(baseline, s), the
two runs sharing everything but the objective (data order, initial student, generation seeds).
A mean difference is *beyond the seed spread* when |mean Δ| is larger than the baseline's own
standard deviation over training seeds — the issue's bar, stricter than a noise-free claim needs,
and meaningful only with two or more seeds.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

# Metrics every run has (from distill and eval rougel); a metrics module adds its own keys.
BASE_METRICS = ("rougeL", "exact_match", "eval_ce", "eval_fkl")


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def metric_keys(results: list[dict[str, Any]], primary: str) -> list[str]:
    """The numeric metrics present in the runs: primary first, then the base ones, then the rest."""
    skip = {"seed", "steps", "tokens", "wall_time_s", "tokens_per_s", "peak_rss_mb", "peak_cuda_mb"}
    keys: dict[str, None] = {primary: None, **dict.fromkeys(BASE_METRICS)}
    for r in results:
        for k, v in r.items():
            if isinstance(v, int | float) and not isinstance(v, bool) and k not in skip and "_std" not in k:
                keys[k] = None
    return [k for k in keys if k == primary or any(isinstance(r.get(k), int | float) for r in results)]


def aggregate(results: list[dict[str, Any]], primary: str = "rougeL") -> list[dict[str, Any]]:
    """One row per objective: mean and std over training seeds of every metric, best ``primary`` first.

    With one seed, ``rougeL_std`` falls back to the spread over generation seeds.
    """
    keys = metric_keys(results, primary) if results else [primary]
    rows = []
    for objective in dict.fromkeys(r["objective"] for r in results):
        ok = [r for r in results if r["objective"] == objective and r["status"] == "ok"]
        row: dict[str, Any] = {
            "objective": objective,
            "seeds": len(ok),
            "failed": sum(r["objective"] == objective and r["status"] != "ok" for r in results),
            "init": next((r.get("init") for r in ok), None),
        }
        for key in (*keys, "wall_time_s", "tokens_per_s", "peak_rss_mb"):
            row[key], row[f"{key}_std"] = mean_std([r[key] for r in ok if r.get(key) is not None])
        if len(ok) == 1 and "rougeL_std" in ok[0]:
            row["rougeL_std"] = ok[0]["rougeL_std"]
        rows.append(row)
    return sorted(rows, key=lambda r: -1e300 if r.get(primary) is None else r[primary], reverse=True)


def paired(results: list[dict[str, Any]], baseline: str, metric: str) -> dict[str, dict[str, Any]]:
    """Per objective ≠ baseline: per-seed Δ to the baseline, mean Δ, and whether it is beyond the spread."""
    ok = [r for r in results if r["status"] == "ok" and r.get(metric) is not None]
    base = {r["seed"]: r[metric] for r in ok if r["objective"] == baseline}
    _, spread = mean_std(list(base.values()))
    out: dict[str, dict[str, Any]] = {}
    for objective in dict.fromkeys(r["objective"] for r in ok if r["objective"] != baseline):
        deltas = {
            r["seed"]: r[metric] - base[r["seed"]]
            for r in ok
            if r["objective"] == objective and r["seed"] in base
        }
        if not deltas:
            continue
        mean = statistics.fmean(deltas.values())
        out[objective] = {
            "deltas": deltas,
            "mean": mean,
            "baseline_std": spread,
            "beyond_spread": spread is not None and len(deltas) > 1 and abs(mean) > spread,
        }
    return out


def fmt(value: Any, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def pm(row: dict[str, Any], key: str, spec: str = ".2f") -> str:
    std = row.get(f"{key}_std")
    return fmt(row.get(key), spec) + ("" if std is None else f" ± {fmt(std, spec)}")


def delta_cell(pair: dict[str, Any] | None) -> str:
    if pair is None:
        return ""
    seeds = ", ".join(f"{d:+.2f}" for _, d in sorted(pair["deltas"].items()))
    mean = f"{pair['mean']:+.2f}"
    return f"{'**' + mean + '**' if pair['beyond_spread'] else mean} ({seeds})"


def subtask_names(results: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k.split("/")[0] for r in results for k in r if "/" in k))


def report_markdown(
    spec: Any,
    rows: list[dict[str, Any]],
    refs: list[dict[str, Any]],
    results: list[dict[str, Any]],
    elapsed: float,
) -> str:
    primary, baseline = spec.primary_metric, spec.baseline
    multi = len(spec.seeds) > 1
    seeds_note = "std over training seeds" if multi else "std over generation seeds"
    keys = [k for k in metric_keys(results, primary) if "/" not in k]
    lines = [
        "# kdtool compare",
        "",
        f"- teacher `{spec.teacher}`, student `{spec.student}`, data `{spec.data}`, eval `{spec.eval_data}`",
        f"- objectives {', '.join(spec.objectives)}; training seeds {spec.seeds}; distill flags "
        f"`{' '.join(spec.distill_args) or '(defaults)'}`"
        + (f", config `{spec.config}`" if spec.config else ""),
        f"- Rouge-L (MiniLLM protocol): generation seeds {spec.eval_seeds}, "
        f"{'greedy' if spec.greedy else 'sampling at temperature 1'}, max {spec.max_new_tokens} new tokens"
        + (f", first {spec.eval_limit} examples" if spec.eval_limit else ""),
        *(
            f"- `{o}` starts from the same seed's `{src}` student"
            + (f" and adds `{' '.join(spec.objective_args[o])}`" if o in spec.objective_args else "")
            for o, src in spec.init_from.items()
        ),
        *(
            f"- `{o}` adds `{' '.join(args)}` to the distill flags"
            for o, args in spec.objective_args.items()
            if o not in spec.init_from
        ),
        f"- every other run starts from `{spec.student}`",
        f"- total wall time {elapsed / 60:.1f} min",
        "",
        f"Values are mean ± {seeds_note}.",
        "",
        "| # | objective | initial student | " + " | ".join(keys) + " | wall s | tok/s | peak RSS MB |",
        "|---|---|---|" + "---|" * len(keys) + "---|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        cells = [pm(r, k, ".3f" if k.startswith("eval_") or "kl" in k else ".2f") for k in keys]
        lines.append(
            f"| {i} | {r['objective']} | {r.get('init') or 'initial'} | " + " | ".join(cells) + " | "
            f"{fmt(r['wall_time_s'], '.0f')} | {fmt(r['tokens_per_s'], ',.0f')} | {fmt(r['peak_rss_mb'], ',.0f')} |"
        )
    for ref in refs:
        cells = [fmt(ref.get(k), ".3f" if "kl" in k else ".2f") if k in ref else "" for k in keys]
        lines.append(f"| ref | {ref['objective']} | | " + " | ".join(cells) + " | | | |")
    if baseline and multi and any(r["objective"] == baseline for r in results):
        lines += paired_section(results, baseline, [k for k in keys if not k.startswith("eval_")])
    if subtasks := subtask_names(results):
        lines += subtask_section(rows, refs, results, subtasks)
    failed = [r for r in results if r["status"] != "ok"]
    if failed:
        lines += ["", "## Failed runs", ""] + [
            f"- {r['objective']} seed {r['seed']}: {r['error']}" for r in failed
        ]
    return "\n".join(lines) + "\n"


def paired_section(results: list[dict[str, Any]], baseline: str, keys: list[str]) -> list[str]:
    pairs = {k: paired(results, baseline, k) for k in keys}
    lines = [
        "",
        f"## Paired differences to `{baseline}`",
        "",
        f"Each objective minus `{baseline}` at the same training seed: mean (per seed). **Bold**: |mean| is "
        f"larger than `{baseline}`'s own std over training seeds ("
        + ", ".join(f"{k} {fmt(next(iter(p.values()))['baseline_std'])}" for k, p in pairs.items() if p)
        + ").",
        "",
        "| objective | " + " | ".join(f"Δ {k}" for k in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for objective in dict.fromkeys(o for p in pairs.values() for o in p):
        lines.append(
            f"| {objective} | " + " | ".join(delta_cell(pairs[k].get(objective)) for k in keys) + " |"
        )
    return lines


def subtask_section(
    rows: list[dict[str, Any]], refs: list[dict[str, Any]], results: list[dict[str, Any]], subtasks: list[str]
) -> list[str]:
    keys = [k for k in metric_keys(results, "rougeL") if "/" in k]
    lines = [
        "",
        "## Per sub-task",
        "",
        "| objective | " + " | ".join(keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for r in rows:
        lines.append(f"| {r['objective']} | " + " | ".join(pm(r, k, ".2f") for k in keys) + " |")
    for ref in refs:
        lines.append(f"| {ref['objective']} (ref) | " + " | ".join(fmt(ref.get(k)) for k in keys) + " |")
    return lines


def plot(
    rows: list[dict[str, Any]],
    results: list[dict[str, Any]],
    refs: list[dict[str, Any]],
    root: Path,
    primary: str = "rougeL",
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.get(primary) is not None]
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(done) + 2), 4))
    ax.bar(
        [r["objective"] for r in done],
        [r[primary] for r in done],
        yerr=[r.get(f"{primary}_std") or 0 for r in done],
        capsize=4,
        color="tab:blue",
    )
    for ref, style in zip(refs, ("--", ":"), strict=False):
        if ref.get(primary) is not None:
            ax.axhline(ref[primary], linestyle=style, color="gray", label=ref["objective"])
    ax.set_ylabel(primary)
    ax.set_title(f"{primary} per objective (mean ± std)")
    ax.legend()
    fig.tight_layout()
    bars = root / "rougel.png"
    fig.savefig(bars, dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        metrics = Path(r.get("run", "")) / "metrics.jsonl"
        if r["status"] != "ok" or not metrics.is_file():
            continue
        evals = [m for m in map(json.loads, metrics.read_text().splitlines()) if "eval_ce" in m]
        ax.plot(
            [m["step"] for m in evals], [m["eval_ce"] for m in evals], label=f"{r['objective']} s{r['seed']}"
        )
    ax.set_xlabel("step")
    ax.set_ylabel("held-out cross-entropy / token")
    ax.set_title("Training curves")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    curves = root / "curves.png"
    fig.savefig(curves, dpi=120)
    plt.close(fig)
    return [bars, curves]


def print_table(
    rows: list[dict[str, Any]], refs: list[dict[str, Any]], console: Console, primary: str
) -> None:
    table = Table(title=f"kdtool compare (sorted by {primary})")
    cols = list(dict.fromkeys([primary, "rougeL", "exact_match", "eval_ce"]))
    for col in ("objective", *cols, "wall s"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["objective"],
            *(pm(r, c, ".3f" if c == "eval_ce" else ".2f") for c in cols),
            fmt(r["wall_time_s"], ".0f"),
        )
    for ref in refs:
        table.add_row(f"[dim]{ref['objective']} (reference)", *(pm(ref, c) for c in cols), "")
    console.print(table)
