"""Serve entry point: `serve run serve/config.yaml` or `mote-ray serve --model DIR`.

build_app(args) -> Application; config.yaml supplies only `args:`.
"""

from mote_ray.serving.deployments import build


def build_app(args: dict):
    return build(args)
