"""Serve entry point: `serve run serve/config.yaml` or `mote-ray serve --model DIR`.

build_app(args) -> Application; config.yaml supplies only `args:`, which are a ServeConfig: Ray Serve
validates them into the builder's annotated pydantic type before calling it (its typed app builders),
so a misspelt key or a bad value fails the build naming the field. Without a key (api_key_env or
api_keys_file) build refuses unless `insecure: true` (the config listens on 0.0.0.0).
"""

# No `from __future__ import annotations`: Serve reads the annotation as a class to validate `args`.
from ray.serve import Application

from mote_ray.serving.config import ServeConfig
from mote_ray.serving.deployments import build


def build_app(args: ServeConfig) -> Application:
    return build(args)  # a dict from any other caller is validated into a ServeConfig there
