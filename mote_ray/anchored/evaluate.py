"""`mote-ray anchored eval`: base vs rank vs anchor in the paper's Table 1 layout.

Each model answers every task once, greedy, in the strict format; reported per model: accuracy (or
correct refusal decisions for safety tasks), malformed outputs, the mean explanation judge score
(the judge is the base model unless `--judge-model`), and win / tie / loss against the base on the
judge score, prompt by prompt. A DPO output directory (`adapter/` on `reference/` or a hub id) is
loaded as its reference plus its adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

from mote_ray.anchored.data import Task


def _engine_for(spec: str, engine: str):
    from mote_ray.config import EngineConfig
    from mote_ray.engines import create_engine

    p = Path(spec)
    if (p / "adapter" / "adapter_config.json").is_file() and (p / "dpo_metrics.json").is_file():
        ref = json.loads((p / "dpo_metrics.json").read_text())["reference"]
        r = json.loads((p / "adapter" / "adapter_config.json").read_text())["r"]
        from mote_ray.mote.fast import vllm_rank

        eng = create_engine(EngineConfig(model=ref, engine=engine, enable_lora=True, max_lora_rank=vllm_rank(r),
                                         max_loras=1))
        eng.load_adapter("dpo", str(p / "adapter"))
        return eng, "dpo"
    return create_engine(EngineConfig(model=spec, engine=engine)), None


def evaluate(models: dict[str, str], tasks: list[Task], out: str | Path, engine: str = "auto",
             judge_model: str | None = None, explanation_tokens: int = 96) -> dict:
    from mote_ray.anchored.sample import ExplanationJudge, Sampler, mark_correct
    from mote_ray.config import EngineConfig
    from mote_ray.engines import create_engine

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    by_id = {t.id: t for t in tasks}
    answers: dict[str, list[dict]] = {}
    for label, spec in models.items():
        eng, adapter = _engine_for(spec, engine)
        sampler = Sampler(eng, n=1, temperature=0.0, explanation_tokens=explanation_tokens, adapter=adapter)
        rows = sampler.sample(tasks)
        mark_correct(by_id, rows)
        answers[label] = rows
        eng.close()
    base_label = next(iter(models))
    judge_engine = create_engine(EngineConfig(model=judge_model or _base_of(models[base_label]), engine=engine))
    judge = ExplanationJudge(judge_engine)
    table = {}
    for label, rows in answers.items():
        valid = [r for r in rows if r["valid"]]
        for r, s in zip(valid, judge.score(by_id, valid)):
            r["score"] = s
        scored = [r["score"] for r in valid if r.get("score") is not None]
        table[label] = {"accuracy": sum(r.get("correct", False) for r in rows) / len(rows),
                        "malformed": len(rows) - len(valid), "judge_score": sum(scored) / len(scored) if scored else None,
                        "n": len(rows)}
    base = {r["task_id"]: r.get("score") for r in answers[base_label]}
    for label, rows in answers.items():
        wins = ties = losses = 0
        for r in rows:
            a, b = r.get("score"), base.get(r["task_id"])
            if a is None or b is None:
                continue
            wins, ties, losses = wins + (a > b), ties + (a == b), losses + (a < b)
        table[label].update(win=wins, tie=ties, loss=losses)
    result = {"tasks": len(tasks), "judge": judge_model or _base_of(models[base_label]), "models": table,
              "judge_parse_failures": dict(judge.parse_failures)}
    (out / "anchored_eval.json").write_text(json.dumps(result, indent=2))
    (out / "answers.jsonl").write_text("".join(json.dumps({"model": k, **r}) + "\n" for k, v in answers.items() for r in v))
    lines = ["| model | accuracy | judge score (0-5) | win / tie / loss vs " + base_label + " | malformed |",
             "|---|---|---|---|---|"]
    for label, m in table.items():
        js = "n/a" if m["judge_score"] is None else f"{m['judge_score']:.3f}"
        lines.append(f"| {label} | {m['accuracy']:.3f} | {js} | {m['win']} / {m['tie']} / {m['loss']} | {m['malformed']} |")
    (out / "anchored_eval.md").write_text("\n".join(lines) + "\n")
    return result


def _base_of(spec: str) -> str:
    p = Path(spec)
    if (p / "dpo_metrics.json").is_file():
        return json.loads((p / "dpo_metrics.json").read_text())["reference"]
    return spec
