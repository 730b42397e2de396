import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(int(os.environ.get("TRANSFUSION_THREADS", "1")))

from modeling_transfusion import TransfusionConfig, TransfusionForCausalLM, TransfusionProcessor, build_tokenizer  # noqa: E402

TOKENIZER_TEXT = [
    "a photo of a dress",
    "a photo of a sneaker",
    "a red circle to the left of a blue square",
    "two green triangles",
    "The quick brown fox jumps over the lazy dog.",
    "Return a new list containing all items from the iterable in ascending order.",
] * 20


PACKAGES = ("modeling_transfusion", "pipelines", "training", "conversion", "evaluation", "experiments")


def outside_repo_env(tmp_path, env=None) -> dict:
    """The environment of a subprocess that runs as a user with only a saved folder: this repository's packages are
    not importable there, although `make` installs them (editable) into the environment. A sitecustomize on
    PYTHONPATH blocks them, so only a folder's own remote code can be used."""
    guard = Path(tmp_path) / "outside-repo"
    guard.mkdir(parents=True, exist_ok=True)
    (guard / "sitecustomize.py").write_text(f"import sys\nsys.modules.update(dict.fromkeys({PACKAGES!r}))\n")
    base = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)} if env is None else dict(env)
    return {**base, "PYTHONPATH": str(guard)}


def tiny_config(**overrides) -> TransfusionConfig:
    return TransfusionConfig.from_preset("tiny", **overrides)


def randomize_zero_init(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give the zero-initialised output projections random values so image predictions are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "_zero_init", False):
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * 0.05)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.05)
    return model


def tiny_model(seed: int = 0, **overrides) -> TransfusionForCausalLM:
    torch.manual_seed(seed)
    return randomize_zero_init(TransfusionForCausalLM(tiny_config(**overrides)), seed).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer(TOKENIZER_TEXT, vocab_size=300)


@pytest.fixture(scope="session")
def processor(tokenizer):
    return TransfusionProcessor.from_model_config(tokenizer, tiny_config())
