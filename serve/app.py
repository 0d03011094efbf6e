"""Serve entry point: `serve run serve/config.yaml` or `mote-ray serve --model DIR`.

build_app(args) -> Application; config.yaml supplies only `args:`. Without a key (api_key_env or
api_keys_file) build refuses unless `insecure: true` (the config listens on 0.0.0.0).
"""

from mote_ray.serving.deployments import build


def build_app(args: dict):
    return build(args)
