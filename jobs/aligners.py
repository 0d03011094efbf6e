"""`mote-ray aligners ...` as a Ray job, e.g.

    ray job submit --working-dir . -- python jobs/aligners.py data --model M --prompts /mnt/shared/q.jsonl --out /mnt/shared/aligner-data

Same subcommands and flags as `mote-ray aligners`; joins the cluster through $RAY_ADDRESS.
"""

import sys

from mote_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["aligners", *sys.argv[1:]]))
