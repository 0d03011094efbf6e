"""`mote-ray generate-text`: raw engine calls, locally or through a Ray Data engine stage."""

from __future__ import annotations

import json
import sys

from pydantic import Field
from pydantic_settings import CliImplicitFlag, CliPositionalArg

from mote_ray.commands.base import ADDRESS_HELP, ENGINE_HELP, Command, config_flags, engine_flags, extend
from mote_ray.commands.shared import announce_model
from mote_ray.config import EngineConfig, resolve
from mote_ray.errors import MoteError
from mote_ray.records import SamplingParams


class _GenerateText(Command):
    """Raw engine calls: generate text for prompts."""

    prompts: CliPositionalArg[list[str]] = Field(default_factory=list,
                                                 description="prompts (default: one story opening)")
    chat: CliImplicitFlag[bool] = Field(False, description="send each prompt as a user chat message")
    adapter: list[str] = Field(default_factory=list, description="load a PEFT adapter; the last one given is applied")
    ray: CliImplicitFlag[bool] = Field(False, description="run through a Ray Data engine stage on Ray")
    repeat: int = Field(1, ge=1, description="copies of each prompt (with --ray: a bigger dataset)")
    address: str | None = Field(None, description=ADDRESS_HELP)
    as_json: CliImplicitFlag[bool] = Field(False, alias="json", description="print one JSON result per line")

    def run(self) -> int:
        from mote_ray.records import GenerationRequest

        flags = self.flags()
        engine = resolve(EngineConfig, flags={k: v for k, v in flags.items() if k in engine_flags()})
        sampling = resolve(SamplingParams, flags={k: v for k, v in flags.items() if k not in engine_flags()})
        adapters = dict(_split_adapter(a) for a in self.adapter)
        adapter = list(adapters)[-1] if adapters else None
        prompts = self.prompts or ["Once upon a time"]
        requests = [
            GenerationRequest(id=f"{i}-{k}", sampling=sampling, adapter=adapter,
                              **({"messages": [{"role": "user", "content": p}]} if self.chat else {"prompt": p}))
            for i, p in enumerate(prompts) for k in range(self.repeat)
        ]
        config = engine.model_copy(update={"enable_lora": bool(adapters)})
        announce_model(config)
        if self.ray:
            results = _generate_on_ray(config, requests, adapters, self.address)
        else:
            from mote_ray.engines import create_engine

            eng = create_engine(config)
            print(f"mote-ray: engine {eng.name} ({eng.choice_reason})", file=sys.stderr)
            for name, path in adapters.items():
                eng.load_adapter(name, path)
            results = [r.model_dump() for r in eng.generate(requests)]
            eng.close()
        for r in results:
            print(json.dumps(r) if self.as_json
                  else f"[{r['id']}] {r['text']}  ({r['completion_tokens']} tokens, {r['finish_reason']})")
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


def _split_adapter(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise MoteError(f"--adapter must look like NAME=DIR, got {spec!r}")
    return name, path


# Engine flags (EngineConfig) and sampling flags (SamplingParams); this command's sampling defaults.
_fields = {**config_flags(EngineConfig, engine_flags(), help=ENGINE_HELP),
           **config_flags(SamplingParams, {"max_tokens": "max_tokens", "temperature": "temperature",
                                           "top_p": "top_p", "seed": "seed"},
                          defaults={"max_tokens": 48})}
GenerateText = extend(_GenerateText, _fields)
