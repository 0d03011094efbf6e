"""`mote-ray` commands, one module per command; the parser is generated from pydantic models.

Why pydantic-settings (its CLI support) rather than jsonargparse: our configs already are pydantic
models, pydantic-settings builds argparse parsers from them (so --help, unknown-flag errors and exit
codes stay argparse's) with subcommands, positionals and variadic `--prompts a b c` flags, and it is a
pydantic project with no new dependency tree. jsonargparse would change flag syntax (`--prompts+ a`
for lists) and order-dependent precedence between `--config` and flags. Config files are not read
by pydantic-settings here: `mote_ray.config.resolve` layers them, see Command.layers.
"""

from mote_ray.commands.app import build_parser, main, parse

__all__ = ["build_parser", "main", "parse"]
