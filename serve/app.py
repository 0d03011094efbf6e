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
    args = ServeConfig.model_validate(args)  # a dict from any other caller
    if args.loopback_only:  # only `mote-ray serve` knows its host is loopback; a config's http_options may not be
        raise ValueError("loopback_only is set by `mote-ray serve` from --host; a Serve config must give "
                         "api_key_env / api_keys_file, or insecure: true to serve without a key")
    return build(args)
