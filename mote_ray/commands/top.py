"""`mote-ray top`: current throughput of running jobs, from Ray's Prometheus metrics (see mote_ray/top.py)."""

from __future__ import annotations

from pydantic import Field

from mote_ray.commands.base import Command


class Top(Command):
    """Current throughput of running jobs, from Ray's Prometheus metrics."""

    url: list[str] = Field(default_factory=list, description="a Prometheus endpoint, e.g. http://HEAD:8080/metrics "
                           "(repeatable; default: every node's metrics export port, from the Ray cluster at --address)")
    address: str | None = Field(None, description="Ray cluster address (default: $RAY_ADDRESS, else `auto`)")
    interval: float = Field(10.0, description="seconds between the two scrapes of a rate (Ray reports "
                                              "metrics every 10 s)")
    count: int = Field(0, description="refreshes before exiting (0: until Ctrl-C)")

    def run(self) -> int:
        from mote_ray.top import main

        return main(self)
