"""The whole pipeline as a Ray job: generate -> train -> evaluate (base vs MoTE), resumable by stage.

    ray job submit --working-dir . -- python jobs/pipeline.py --out /mnt/shared/mote-pipeline \\
        --config jobs/configs/pipeline.yaml --model Qwen/Qwen2.5-0.5B-Instruct

Same flags as `mote-ray pipeline`; joins the cluster through $RAY_ADDRESS (set by `ray job submit`).
"""

import sys

from mote_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
