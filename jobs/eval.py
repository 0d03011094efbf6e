"""An evaluation as a Ray job (answers fan out over the cluster with Ray Data).

    ray job submit --working-dir . -- python jobs/eval.py --config jobs/configs/eval.yaml --out /mnt/shared/eval

Same flags as `mote-ray eval`; joins the cluster through $RAY_ADDRESS (set by `ray job submit`).
"""

import sys

from mote_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
