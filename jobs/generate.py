"""AlignCoT self-generation as a Ray job.

    ray job submit --working-dir . -- python jobs/generate.py --model Qwen/Qwen2.5-0.5B-Instruct \\
        --prompts data/advbench.csv --out /mnt/shared/chains --config jobs/configs/generate.yaml

Same flags as `mote-ray generate`; joins the cluster through $RAY_ADDRESS (set by `ray job submit`).
"""

import sys

from mote_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
