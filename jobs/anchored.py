"""`mote-ray anchored ...` as a Ray job, e.g.

    ray job submit --working-dir . -- python jobs/anchored.py pairs --model M --data /mnt/shared/obqa.jsonl --format openbookqa --out /mnt/shared/pairs

Same subcommands and flags as `mote-ray anchored`; joins the cluster through $RAY_ADDRESS.
"""

import sys

from mote_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["anchored", *sys.argv[1:]]))
