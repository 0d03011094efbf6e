"""results.json -> report.md and report.html with PNG plots, readable without mote-ray.

Every number in the Markdown and HTML is `fmt(value)` of the JSON's value, so the three agree.
Rates are over every prompt with failed requests as their own category (`error rate`); where requests
failed, the rate among answered prompts stands beside it, labelled. A metric with nothing scored
reads "no data". Plots: one bar chart per suite (each metric's bars per model, 95% interval whiskers,
answered-only rates as hollow markers) and tokens per answer per model (MoTE modes side by side).
Writing the report never fails a finished evaluation: results.json is written first, and a plot that
cannot be drawn is logged and named in the report instead.
"""

from __future__ import annotations

import html
import json
import sys
from pathlib import Path

HIGHER_IS_BETTER = {"error_rate": False, "unsafe_compliance_rate": False, "unsafe_refusal_rate": True,
                    "harmless_rate": True, "refusal_rate": None, "attack_success_rate": False,
                    "strongreject_score": False, "goodness_at_k": True, "compliance_rate": True,
                    "partial_rate": None, "judge_score": True, "win_rate": True, "tie_rate": None}


def fmt(v) -> str:
    return "no data" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def cell(metric: dict | None) -> str:
    """`value [lo, hi]`, plus the answered-only rate when some prompts were not scored."""
    if metric is None:
        return "n/a"
    if metric.get("value") is None:
        return f"no data (n={metric.get('n', 0)})"
    lo, hi = metric["ci"]
    text = f"{fmt(metric['value'])} [{fmt(lo)}, {fmt(hi)}]"
    ans = metric.get("answered_only")
    if metric.get("unscored") and ans and ans.get("value") is not None:
        text += f"; answered only {fmt(ans['value'])} [{fmt(ans['ci'][0])}, {fmt(ans['ci'][1])}] (n={ans['n']})"
    elif metric.get("over") == "answered":
        text += f" (answered only, n={metric['n']})"
    if metric.get("judge") not in (None, "llm"):  # e.g. refusal-only: a bound, not the benchmark's score
        text += f" ({metric['judge']})"
    return text


def write_reports(results: dict, out: str | Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    plots, plot_errors = {}, []
    try:
        plots = _plots(results, out, plot_errors)
    except Exception as e:  # matplotlib missing or broken: the tables still carry every number
        plot_errors.append(f"plots: {type(e).__name__}: {e}")
    for err in plot_errors:
        print(f"mote-ray eval: could not draw a plot ({err}); the report is written without it", file=sys.stderr)
    results = {**results, "plot_errors": plot_errors}
    (out / "report.md").write_text(_markdown(results, plots))
    (out / "report.html").write_text(_html(results, plots))
    return {"json": out / "results.json", "md": out / "report.md", "html": out / "report.html"}


def _rows(suite: dict):
    for model, res in suite["models"].items():
        yield model, res


def _plots(results: dict, out: Path, errors: list[str]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    for name, suite in results["suites"].items():
        try:
            if _suite_plot(plt, name, suite, out / f"plot-{name}.png"):
                files[name] = f"plot-{name}.png"
        except Exception as e:  # one bad figure must not cost the report (or the other figures)
            errors.append(f"{name}: {type(e).__name__}: {e}")
        finally:
            plt.close("all")
    tokens = {(s, m): r["tokens_per_answer"] for s, suite in results["suites"].items() for m, r in _rows(suite)
              if r.get("tokens_per_answer") is not None}
    if tokens:
        try:
            fig, ax = plt.subplots(figsize=(6, 3.4))
            labels = [f"{m}\n{s}" for s, m in tokens]
            ax.bar(range(len(tokens)), list(tokens.values()), color="#5a8")
            ax.set_xticks(range(len(tokens)), labels, fontsize=7)
            ax.set_ylabel("generated tokens per answer")
            ax.set_title("tokens per answer (all stages)")
            fig.tight_layout()
            fig.savefig(out / "plot-tokens.png", dpi=110)
            files["tokens"] = "plot-tokens.png"
        except Exception as e:
            errors.append(f"tokens: {type(e).__name__}: {e}")
        finally:
            plt.close("all")
    return files


def _suite_plot(plt, name: str, suite: dict, path: Path) -> bool:
    metrics = sorted({m for _, res in _rows(suite) for m in res["metrics"]})
    models = list(suite["models"])
    if not metrics:
        return False
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(metrics) * max(1, len(models)) / 2), 3.6))
    width = 0.8 / max(len(models), 1)
    for i, model in enumerate(models):
        ms = suite["models"][model]["metrics"]
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(metrics))]
        have = [(x, ms[m]) for x, m in zip(xs, metrics) if ms.get(m) and ms[m].get("value") is not None]
        for x, m in zip(xs, metrics):
            if not ms.get(m) or ms[m].get("value") is None:
                ax.text(x, 0.02, "no data", rotation=90, ha="center", va="bottom", fontsize=6)
        if not have:
            continue
        vals = [v["value"] for _, v in have]
        # Whiskers are distances, so never negative (rounding can put a bound a hair past the value).
        lo = [max(0.0, v["value"] - v["ci"][0]) for _, v in have]
        hi = [max(0.0, v["ci"][1] - v["value"]) for _, v in have]
        bars = ax.bar([x for x, _ in have], vals, width, yerr=[lo, hi], capsize=3, label=model)
        ans = [(x, v["answered_only"]["value"]) for x, v in have
               if v.get("unscored") and (v.get("answered_only") or {}).get("value") is not None]
        if ans:
            ax.scatter([x for x, _ in ans], [a for _, a in ans], marker="o", facecolors="none",
                       edgecolors=bars.patches[0].get_facecolor(), zorder=3,
                       label=f"{model} (answered only)")
    ax.set_xticks(range(len(metrics)), [m.replace("_", " ") for m in metrics], fontsize=8)
    ax.set_title(f"{name}: over all prompts, failed requests as error rate (95% intervals)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def _table(suite: dict) -> tuple[list[str], list[list[str]]]:
    metrics = sorted({m for _, res in _rows(suite) for m in res["metrics"]})
    head = ["model", *metrics, "answered", "failed", "tokens/answer", "stages used"]
    body = []
    for model, res in _rows(suite):
        ms = res["metrics"]
        cells = [cell(ms.get(m)) for m in metrics]
        stages = ", ".join(f"{k}: {v}" for k, v in res.get("stages_used", {}).items())
        body.append([model, *cells, str(res["answered"]), str(res.get("errors", 0)), fmt(res.get("tokens_per_answer")),
                     stages])
    return head, body


def _markdown(results: dict, plots: dict) -> str:
    lines = ["# mote-ray evaluation", ""]
    if results.get("warning"):
        lines += [f"> **Warning: {results['warning']}**", ""]
    lines += [results.get("summary", ""), ""]
    for name, suite in results["suites"].items():
        head, body = _table(suite)
        lines += [f"## {name}", "", f"Data: {', '.join(suite.get('data', []))} ({suite.get('items', '?')} prompts, "
                  f"{suite.get('rejects', 0)} rejected rows). Values with 95% intervals.", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        if suite.get("scoring"):
            lines += ["", f"Scoring: {suite['scoring']}"]
        if name in plots:
            lines += ["", f"![{name}]({plots[name]})"]
        lines.append("")
    for err in results.get("plot_errors", []):
        lines += [f"Plot not drawn: {err}", ""]
    if "tokens" in plots:
        lines += ["## Tokens per answer", "", f"![tokens]({plots['tokens']})", ""]
    return "\n".join(lines)


def _html(results: dict, plots: dict) -> str:
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>mote-ray evaluation</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}th{background:#f4f4f4}</style></head><body>",
             "<h1>mote-ray evaluation</h1>"]
    if results.get("warning"):
        parts.append(f"<p style='background:#fdd;padding:8px'><b>Warning: {e(results['warning'])}</b></p>")
    parts.append(f"<p>{e(results.get('summary', ''))}</p>")
    for name, suite in results["suites"].items():
        head, body = _table(suite)
        parts.append(f"<h2>{e(name)}</h2><p>Data: {e(', '.join(suite.get('data', [])))} ({suite.get('items', '?')} "
                     f"prompts, {suite.get('rejects', 0)} rejected rows). Values with 95% intervals.</p><table>")
        parts.append("<tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
        for row in body:
            parts.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
        parts.append("</table>")
        if suite.get("scoring"):
            parts.append(f"<p>Scoring: {e(suite['scoring'])}</p>")
        if name in plots:
            parts.append(f"<p><img src='{plots[name]}' alt='{e(name)}'></p>")
    if "tokens" in plots:
        parts.append(f"<h2>Tokens per answer</h2><p><img src='{plots['tokens']}' alt='tokens per answer'></p>")
    parts += [f"<p>Plot not drawn: {e(err)}</p>" for err in results.get("plot_errors", [])]
    parts.append("</body></html>")
    return "\n".join(parts)
