"""`mote-ray serve`: a trained MoTE model behind an OpenAI-compatible API on Ray Serve (blocks)."""

from __future__ import annotations

from mote_ray.commands.base import Command, address_field, app_flags, extend
from mote_ray.commands.shared import bind_policy, run_app
from mote_ray.serving.config import ServeConfig


class _Serve(Command):
    """Serve a trained MoTE model: OpenAI-compatible API on Ray Serve (blocks).

    Every flag but --port, --host and --address sets the ServeConfig field of its name, what
    serve/config.yaml's `args:` hold (--timeout sets timeout_s)."""

    port: int = 8000
    host: str = "127.0.0.1"
    address: str | None = address_field()

    def serve_config(self) -> ServeConfig:
        """The app's validated config: the flags given, and `insecure` / `loopback_only` as --host allows."""
        return self.layers(ServeConfig, **bind_policy(self))

    def run(self) -> int:
        config = self.serve_config()
        from mote_ray.serving.deployments import build  # Ray Serve: imported once the flags are valid

        return run_app(build(config), self, f"serving {config.model}")


Serve = extend(_Serve, app_flags(ServeConfig))
