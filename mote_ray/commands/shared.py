"""Run-time helpers several commands use: model announcement, clean JSON stdout, binding a Serve app."""

from __future__ import annotations

import contextlib
import os
import sys

from mote_ray.errors import MoteError


def announce_model(config) -> None:
    from mote_ray.models import resolve_model

    m = resolve_model(config.model, config.gguf_file)
    if m.source == "offline-default":
        print(f"mote-ray: model {m.name} (offline default: tiny random-weight Llama built at {m.path}; "
              f"it writes noise — pass --model or set MOTE_MODEL for a real model)", file=sys.stderr)
    else:
        print(f"mote-ray: model {m.name} ({m.source}: {m.path})", file=sys.stderr)


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


def bind_policy(cmd) -> dict:
    """Without a key the app listens on loopback only, unless --insecure; says which at start."""
    keyed = bool(cmd.api_key_env or getattr(cmd, "api_keys_file", None))
    loopback = cmd.host in ("127.0.0.1", "localhost", "::1")
    if keyed:
        print("mote-ray: auth: a bearer key is required", file=sys.stderr)
    elif cmd.insecure:
        print(f"mote-ray: auth: NONE (--insecure): anyone who can reach {cmd.host} can use it", file=sys.stderr)
    elif loopback:
        print("mote-ray: auth: none, so listening on loopback only (give --api-key-env/--api-keys-file to require a "
              "key, or --insecure to listen beyond loopback without one)", file=sys.stderr)
    else:
        raise MoteError(f"refusing to listen on {cmd.host} without an API key: give --api-key-env or --api-keys-file, "
                        "or --insecure to do it anyway")
    return {"insecure": bool(cmd.insecure), "loopback_only": loopback}


def run_app(app, cmd, what: str) -> int:
    """Start a Serve app on local Ray (or --address) and block until SIGTERM / Ctrl-C."""
    import signal
    import time

    from ray import serve

    from mote_ray.cluster import init_ray

    init_ray(cmd.address)
    serve.start(http_options={"host": cmd.host, "port": cmd.port})
    serve.run(app, name="mote", route_prefix="/")
    print(f"mote-ray: {what} at http://{cmd.host}:{cmd.port}/v1 (Ctrl-C to stop)", file=sys.stderr)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(0.5)
    finally:
        serve.shutdown()
    return 0
