"""`mote-ray serve` in a child process on a free loopback port: for tests, benchmarks and evaluations
that want the real HTTP app without a cluster. Stops only what it started (its own process group)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from mote_ray.errors import MoteError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """with LocalServer(["--model", DIR, "--path", "lora"]) as srv: srv.base_url -> http://127.0.0.1:PORT
    (`command=("aligners", "serve")` for the squad proxy)."""

    def __init__(self, serve_args: list[str], env: dict | None = None, ready_timeout: float = 240.0,
                 command: tuple[str, ...] = ("serve",)):
        self.command = command
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.args, self.env, self.ready_timeout = serve_args, env or {}, ready_timeout
        self.log = tempfile.NamedTemporaryFile("w+", prefix="mote-serve-", suffix=".log", delete=False)
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> LocalServer:
        env = {**os.environ, "RAY_ADDRESS": "", **self.env}  # its own local Ray, not the caller's
        self.proc = subprocess.Popen([sys.executable, "-m", "mote_ray.cli", *self.command, *self.args, "--port", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + self.ready_timeout
        try:
            while time.monotonic() < deadline:
                try:
                    urllib.request.urlopen(self.base_url + "/readyz", timeout=2)
                    return self
                except OSError:  # refused, reset, or 404 before the app is deployed
                    if self.proc.poll() is not None:
                        break
                    time.sleep(1)
        except BaseException:  # interrupted while waiting: do not leave the server behind
            self.__exit__()
            raise
        out = self.output()
        self.__exit__()
        raise MoteError(f"`mote-ray serve` did not become ready: {out[-2000:]}")

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()

    def session_pids(self, title: str) -> list[int]:
        """Pids of this server's processes whose command line contains `title` (e.g. a Serve replica)."""
        out = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True).stdout
        pids = []
        for line in out.splitlines():
            pid, sid, args = line.strip().split(None, 2) if len(line.split(None, 2)) == 3 else (0, 0, "")
            if int(sid) == self.proc.pid and title in args:
                pids.append(int(pid))
        return pids

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            # SIGTERM to the command alone, as Ctrl-C would: it shuts Serve down on a live cluster. Sent
            # to the whole group it also killed Ray's daemons first, and Serve's shutdown then waited
            # ~40 s on a controller that was gone.
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                pass
        if self.proc:
            try:  # whatever Ray left in the group (raylet, workers)
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
