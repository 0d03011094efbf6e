"""Raw engine calls as a Ray job (the engine layer end to end on a cluster).

    ray job submit --working-dir . -- python jobs/generate_text.py --ray --model Qwen/Qwen2.5-0.5B-Instruct --chat "Hi"

Takes the same flags as `mote-ray generate-text`; joins the cluster through $RAY_ADDRESS.
"""

import sys

from mote_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate-text", *sys.argv[1:]]))
