"""results.json -> report.md and report.html with PNG plots, readable without mote-ray.

Every number in the Markdown and HTML is `fmt(value)` of the JSON's value, so the three agree.
Plots: one bar chart per suite (each metric's bars per model, 95% interval whiskers) and tokens per
answer per model (MoTE modes side by side).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

HIGHER_IS_BETTER = {"harmless_rate": True, "refusal_rate": None, "attack_success_rate": False,
                    "strongreject_score": False, "goodness_at_k": True, "compliance_rate": True,
                    "partial_rate": None, "judge_score": True, "win_rate": True, "tie_rate": None}


def fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def write_reports(results: dict, out: str | Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    plots = _plots(results, out)
    (out / "report.md").write_text(_markdown(results, plots))
    (out / "report.html").write_text(_html(results, plots))
    return {"json": out / "results.json", "md": out / "report.md", "html": out / "report.html"}


def _rows(suite: dict):
    for model, res in suite["models"].items():
        yield model, res


def _plots(results: dict, out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    for name, suite in results["suites"].items():
        metrics = sorted({m for _, res in _rows(suite) for m in res["metrics"]})
        models = list(suite["models"])
        if not metrics:
            continue
        fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(metrics) * max(1, len(models)) / 2), 3.6))
        width = 0.8 / max(len(models), 1)
        for i, model in enumerate(models):
            ms = suite["models"][model]["metrics"]
            vals = [ms[m]["value"] if m in ms else 0 for m in metrics]
            lo = [ms[m]["value"] - ms[m]["ci"][0] if m in ms else 0 for m in metrics]
            hi = [ms[m]["ci"][1] - ms[m]["value"] if m in ms else 0 for m in metrics]
            xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(metrics))]
            ax.bar(xs, vals, width, yerr=[lo, hi], capsize=3, label=model)
        ax.set_xticks(range(len(metrics)), [m.replace("_", " ") for m in metrics], fontsize=8)
        ax.set_title(f"{name} (95% intervals)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        files[name] = f"plot-{name}.png"
        fig.savefig(out / files[name], dpi=110)
        plt.close(fig)
    tokens = {(s, m): r["tokens_per_answer"] for s, suite in results["suites"].items() for m, r in _rows(suite)
              if r.get("tokens_per_answer") is not None}
    if tokens:
        fig, ax = plt.subplots(figsize=(6, 3.4))
        labels = [f"{m}\n{s}" for s, m in tokens]
        ax.bar(range(len(tokens)), list(tokens.values()), color="#5a8")
        ax.set_xticks(range(len(tokens)), labels, fontsize=7)
        ax.set_ylabel("generated tokens per answer")
        ax.set_title("tokens per answer (all stages)")
        fig.tight_layout()
        files["tokens"] = "plot-tokens.png"
        fig.savefig(out / files["tokens"], dpi=110)
        plt.close(fig)
    return files


def _table(suite: dict) -> tuple[list[str], list[list[str]]]:
    metrics = sorted({m for _, res in _rows(suite) for m in res["metrics"]})
    head = ["model", *metrics, "n", "tokens/answer", "stages used"]
    body = []
    for model, res in _rows(suite):
        ms = res["metrics"]
        cells = [f"{fmt(ms[m]['value'])} [{fmt(ms[m]['ci'][0])}, {fmt(ms[m]['ci'][1])}]" if m in ms else "n/a"
                 for m in metrics]
        stages = ", ".join(f"{k}: {v}" for k, v in res.get("stages_used", {}).items())
        body.append([model, *cells, str(res["answered"]), fmt(res.get("tokens_per_answer")), stages])
    return head, body


def _markdown(results: dict, plots: dict) -> str:
    lines = [f"# mote-ray evaluation", "", results.get("summary", ""), ""]
    for name, suite in results["suites"].items():
        head, body = _table(suite)
        lines += [f"## {name}", "", f"Data: {', '.join(suite.get('data', []))} ({suite.get('items', '?')} prompts, "
                  f"{suite.get('rejects', 0)} rejected rows). Values with 95% intervals.", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        if name in plots:
            lines += ["", f"![{name}]({plots[name]})"]
        lines.append("")
    if "tokens" in plots:
        lines += ["## Tokens per answer", "", f"![tokens]({plots['tokens']})", ""]
    return "\n".join(lines)


def _html(results: dict, plots: dict) -> str:
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>mote-ray evaluation</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}th{background:#f4f4f4}</style></head><body>",
             "<h1>mote-ray evaluation</h1>", f"<p>{e(results.get('summary', ''))}</p>"]
    for name, suite in results["suites"].items():
        head, body = _table(suite)
        parts.append(f"<h2>{e(name)}</h2><p>Data: {e(', '.join(suite.get('data', [])))} ({suite.get('items', '?')} "
                     f"prompts, {suite.get('rejects', 0)} rejected rows). Values with 95% intervals.</p><table>")
        parts.append("<tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
        for row in body:
            parts.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
        parts.append("</table>")
        if name in plots:
            parts.append(f"<p><img src='{plots[name]}' alt='{e(name)}'></p>")
    if "tokens" in plots:
        parts.append(f"<h2>Tokens per answer</h2><p><img src='{plots['tokens']}' alt='tokens per answer'></p>")
    parts.append("</body></html>")
    return "\n".join(parts)
