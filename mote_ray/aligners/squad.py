"""The squad: inspectors score an answer, aligners fix it, per sample.

For each (prompt, answer): score with every inspector; while some criterion scores below the
threshold and its aligner has not run, run the aligner of the lowest-scoring such criterion,
re-score every criterion on the new answer, and record the pass. Each aligner runs at most once.
The trace says which aligners ran, in order, with all scores before and after each pass.
"""

from __future__ import annotations

import json
from pathlib import Path

from mote_ray.aligners.train import aligner_text, inspector_text
from mote_ray.errors import MoteError


class Squad:
    """Squad(dir) or Squad(scorers=..., aligners=...) with callables, e.g. for control-flow tests."""

    # transformers by default: a squad holds one engine per aligner, and each vLLM engine would reserve
    # its own share of (GPU or host) memory up front; the aligners are small.
    def __init__(self, squad_dir: str | Path | None = None, engine: str = "transformers", threshold: float | None = None,
                 scorers: dict | None = None, aligners: dict | None = None, max_tokens: int = 128):
        self.max_tokens = max_tokens
        if squad_dir is not None:
            d = Path(squad_dir)
            if not (d / "squad.json").is_file():
                raise MoteError(f"{squad_dir} is not a squad directory (no squad.json); run `mote-ray aligners train`")
            meta = json.loads((d / "squad.json").read_text())
            self.threshold = threshold if threshold is not None else meta["threshold"]
            self.scorers = {c: self._inspector(d / p) for c, p in meta["inspectors"].items()}
            self.aligners = {c: self._aligner(d / p, engine) for c, p in meta["aligners"].items()}
        else:
            self.threshold = 0.5 if threshold is None else threshold
            self.scorers, self.aligners = dict(scorers or {}), dict(aligners or {})

    # ------------------------------------------------------------------ parts
    @staticmethod
    def _inspector(path: Path):
        import numpy as np

        from mote_ray.eval.refusal import embed

        w = json.loads(path.read_text())
        coef, b = np.asarray(w["coef"], dtype="float32"), w["intercept"]

        def score(prompts, answers):
            z = embed([inspector_text(p, a) for p, a in zip(prompts, answers)]) @ coef + b
            return (1 / (1 + np.exp(-z))).tolist()

        return score

    def _aligner(self, path: Path, engine: str):
        from mote_ray.config import EngineConfig
        from mote_ray.engines import create_engine
        from mote_ray.records import GenerationRequest, SamplingParams

        eng = create_engine(EngineConfig(model=str(path), engine=engine))
        done = eng.tokenizer.convert_tokens_to_ids("[DONE]")

        def align(prompts, answers):
            reqs = [GenerationRequest(id=str(i), prompt=aligner_text(p, a), sampling=SamplingParams(
                max_tokens=self.max_tokens, stop_token_ids=(done,))) for i, (p, a) in enumerate(zip(prompts, answers))]
            return [r.text.strip() for r in eng.generate(reqs)]

        return align

    # ------------------------------------------------------------------ the squad
    def _scores(self, prompts, answers) -> list[dict[str, float]]:
        per = {c: s(prompts, answers) for c, s in self.scorers.items()}
        return [{c: round(per[c][i], 4) for c in per} for i in range(len(answers))]

    def align(self, prompts: list[str], answers: list[str]) -> list[dict]:
        """Per sample: {answer, original, trace: [{aligner, before, after}], scores}; batched per pass."""
        answers = list(answers)
        scores = self._scores(prompts, answers)
        traces: list[list[dict]] = [[] for _ in answers]
        used: list[set] = [set() for _ in answers]
        while True:
            picks = {}  # sample -> criterion to run now: its lowest score under the threshold, not run yet
            for i, sc in enumerate(scores):
                low = [(v, c) for c, v in sc.items() if v < self.threshold and c not in used[i] and c in self.aligners]
                if low:
                    picks[i] = min(low)[1]
            if not picks:
                break
            for criterion in sorted(set(picks.values())):
                idx = [i for i, c in picks.items() if c == criterion]
                new = self.aligners[criterion]([prompts[i] for i in idx], [answers[i] for i in idx])
                after = self._scores([prompts[i] for i in idx], new)
                for i, text, sc in zip(idx, new, after):
                    traces[i].append({"aligner": criterion, "before": scores[i], "after": sc})
                    used[i].add(criterion)
                    answers[i], scores[i] = text, sc
        return [{"answer": a, "trace": t, "scores": s} for a, t, s in zip(answers, traces, scores)]


class SquadStage:
    """Ray Data actor for `mote-ray aligners apply`: rows with prompt, answer -> + aligned, trace."""

    def __init__(self, squad_dir: str, engine: str = "transformers"):
        self.squad = Squad(squad_dir, engine)

    def __call__(self, batch):
        import pyarrow as pa

        rows = batch.to_pylist()
        out = self.squad.align([r["prompt"] for r in rows], [r["answer"] for r in rows])
        for r, o in zip(rows, out):
            r.update(aligned=o["answer"], aligners_run=[t["aligner"] for t in o["trace"]],
                     trace=json.dumps(o["trace"]), scores=json.dumps(o["scores"]))
        return pa.Table.from_pylist(rows)


def run_apply(squad_dir: str, input_path: str, out: str | Path, engine: str = "transformers") -> dict:
    """A Ray Data job over a file of (prompt, answer) rows; bad rows go to rejects with reasons."""
    import ray

    from mote_ray.cluster import init_ray
    from mote_ray.inputs import records

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, rejects = [], []
    for n, r in records(input_path):
        if not isinstance(r, dict) or not all(isinstance(r.get(k), str) and r[k].strip() for k in ("prompt", "answer")):
            rejects.append({"row": n, "reason": "needs non-empty text fields `prompt` and `answer`", "raw": str(r)[:200]})
            continue
        rows.append({"row": n, "prompt": r["prompt"], "answer": r["answer"]})
    (out / "rejects.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rejects))
    if not rows:
        raise MoteError(f"no usable (prompt, answer) rows in {input_path}; see {out / 'rejects.jsonl'}")
    init_ray()
    cpus = ray.available_resources().get("CPU", 1)
    res = ray.data.from_items(rows).map_batches(
        SquadStage, fn_constructor_kwargs={"squad_dir": str(Path(squad_dir).resolve()), "engine": engine},
        batch_size=32, batch_format="pyarrow", num_cpus=max(0.5, cpus - 1) if cpus > 1 else 0.5,
        compute=ray.data.ActorPoolStrategy(size=1)).take_all()
    res.sort(key=lambda r: r["row"])
    (out / "aligned.jsonl").write_text("".join(json.dumps(r) + "\n" for r in res))
    stats = {"rows": len(res), "rejects": len(rejects), "changed": sum(r["aligned"] != r["answer"] for r in res),
             "aligners_run": {c: sum(c in r["aligners_run"] for r in res) for c in {c for r in res for c in r["aligners_run"]}}}
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats
