"""`mote-ray` command line: the commands live in mote_ray/commands/ (one module each); user errors
print one line and exit 2."""

from __future__ import annotations

import sys

from mote_ray.commands import build_parser, main, parse

__all__ = ["build_parser", "main", "parse"]

if __name__ == "__main__":
    sys.exit(main())
