"""Every shipped config loads and validates without building an engine."""

from pathlib import Path

import pytest

from mote_ray.config import load_yaml

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "jobs" / "configs").glob("*.yaml"))
LOADERS = {"generate": "mote_ray.generation:GenerateConfig", "train": "mote_ray.training.run:TrainConfig",
           "pipeline": "mote_ray.pipeline:PipelineConfig", "eval": "mote_ray.eval.run:EvalConfig"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_validates(path):
    import importlib

    module, cls = LOADERS[path.stem].split(":")
    config = getattr(importlib.import_module(module), cls)(**load_yaml(path))
    assert config.model_dump()
    assert path.read_text().startswith("# mote-ray ")  # headed by the command that runs it


def test_serve_config_is_a_valid_serve_deploy_config():
    from ray.serve.schema import ServeDeploySchema

    data = load_yaml(Path(__file__).resolve().parents[1] / "serve" / "config.yaml")
    schema = ServeDeploySchema(**data)
    app = schema.applications[0]
    assert app.import_path == "serve.app:build_app" and app.args["path"] in ("exact", "fast")
    assert {d.name for d in app.deployments} <= {"Router", "ExactExpert", "FastExpert"}
    assert all(d.autoscaling_config for d in app.deployments)
