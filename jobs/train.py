"""MoTE fine-tuning as a Ray job.

    ray job submit --working-dir . -- python jobs/train.py --model Qwen/Qwen2.5-0.5B-Instruct \\
        --chains /mnt/shared/chains --out /mnt/shared/mote-run --workers 4 --config jobs/configs/train.yaml

Same flags as `mote-ray train`; joins the cluster through $RAY_ADDRESS (set by `ray job submit`).
"""

import sys

from mote_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
