import subprocess
import sys


def test_import_is_light():
    code = ("import sys, mote_ray, mote_ray.cli, mote_ray.config, mote_ray.records, mote_ray.engines, "
            "mote_ray.models, mote_ray.chat, mote_ray.cluster, mote_ray.engine_stage, mote_ray.eval.suites, "
            "mote_ray.eval.report, mote_ray.eval.run, mote_ray.anchored.pairs, mote_ray.aligners.criteria, "
            "mote_ray.pipeline; "
            "heavy = [m for m in ('torch', 'vllm', 'ray', 'transformers') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "mote_ray.cli", "--help"], capture_output=True, text=True).stdout
    assert all(c in out for c in ("info", "generate-text", "generate", "train", "serve", "eval", "pipeline",
                                  "aligners", "anchored"))
