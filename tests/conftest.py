"""Shared fixtures. Models and data come from ../shared (or $MOTE_SHARED); never from the hub."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("MOTE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
MODELS = SHARED / "models"
DATASETS = SHARED / "datasets"


# What tests read from ../shared; without any of it those tests skip.
NEEDED = ("models", "datasets", "openai", "kuberay")


def pytest_configure(config):
    # Without ../shared (or vLLM) nearly every test skips, and a run that tests nothing must not pass in CI.
    if os.environ.get("CI", "").lower() not in ("true", "1"):
        return
    missing = [d for d in NEEDED if not (SHARED / d).is_dir()]
    if len(missing) == len(NEEDED):
        raise pytest.UsageError(f"CI=true but the shared models and datasets are missing at {SHARED} (models/ and "
                                f"datasets/); put shared/ beside the repository or set MOTE_SHARED to its path")
    if missing:
        raise pytest.UsageError(f"CI=true but {SHARED} lacks {', '.join(d + '/' for d in missing)}: the tests that "
                                f"read them would skip")
    if not vllm_available():
        raise pytest.UsageError("CI=true but vllm is not importable: every vLLM test would skip (./install.sh "
                                "installs it)")


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run where torch sees CUDA and are skipped (listed by -ra) elsewhere."""
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu test: torch sees no CUDA device")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path} (set MOTE_SHARED to the folder holding models/ and datasets/)")
    return path


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """The real 293K-param TinyStories Llama (head_dim 8: transformers only)."""
    return str(_need(MODELS / "stories260K"))


@pytest.fixture(scope="session")
def tiny_model_hd32() -> str:
    """The same model with heads padded to 32 dims so vLLM loads it."""
    return str(_need(MODELS / "stories260K-hd32"))


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    return _need(DATASETS)


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory):
    # The offline default model is built into $MOTE_HOME; keep tests off the user's cache.
    os.environ.setdefault("MOTE_HOME", str(tmp_path_factory.mktemp("mote-home")))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.pop("MOTE_MODEL", None)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance with 2 CPUs for every integration test (the CI machine's size)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


requires_vllm = pytest.mark.skipif(not vllm_available(), reason="vllm is not installed")


@pytest.fixture(scope="session")
def random_mote(tiny_model_hd32):
    """A MoTE model whose experts and stage rows are random and large, so every expert matters."""
    import torch

    from mote_ray.mote.model import MoTEConfig, build_mote_model

    torch.manual_seed(0)
    model, tok = build_mote_model(tiny_model_hd32, MoTEConfig(r=4, prompt_expert="answer"))
    with torch.no_grad():
        for m in model.mote_layers():
            m.lora_B.normal_(0, 0.3)
        model.lm.get_input_embeddings().new_rows.normal_(0, 1.0)
        model.lm.lm_head.new_rows.normal_(0, 0.5)
    return model.eval(), tok


@pytest.fixture(scope="session")
def random_mote_dir(random_mote, tmp_path_factory):
    """The random MoTE model saved as a `mote-ray train` output (base/ + mote/)."""
    from mote_ray.mote.export import save_base, save_mote

    model, tok = random_mote
    out = tmp_path_factory.mktemp("random-mote")
    save_mote(model, out / "mote", save_base(model, tok, out / "base"))
    return out


@pytest.fixture(scope="session")
def format_mote_dir(ray_local, tiny_model_hd32, tmp_path_factory):
    """One tiny MoTE model per session, trained by the real training job on format-only chains
    (tests/fakes.py) until it writes every stage and closes each with its own end token; the base is
    the vLLM-loadable tiny model. Shared and read-only: a test that serves it or writes next to it
    takes `copy_model(format_mote_dir, dest)`."""
    from mote_ray.training.run import TrainConfig, run_train

    from .fakes import write_format_chains

    d = tmp_path_factory.mktemp("format-mote")
    write_format_chains(d / "chains", 32, question="Question number {i}?")
    cfg = TrainConfig(model=tiny_model_hd32, max_steps=60, batch_size=8, lr=1e-2, checkpoint_every=60, val_share=0.0,
                      schedule="constant", warmup_ratio=0.0, max_grad_norm=None, mote={"r": 8, "p_skip": 0.0})
    run_train(cfg, d / "chains", d / "run")
    return d / "run"


def copy_model(src: Path, dest: Path) -> Path:
    """A private copy of a shared trained model, for a test that may write into it."""
    import shutil

    shutil.copytree(src, dest)
    return dest
