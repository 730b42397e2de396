"""The bundled checkpoint loads offline and produces an image and a caption (a fast smoke test)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT

from pipelines import TransfusionPipeline

BUNDLED = ROOT / "checkpoints" / "transfusion-tiny"


@pytest.fixture(scope="module")
def pipe():
    assert (BUNDLED / "model_index.json").exists(), f"the bundled checkpoint is missing at {BUNDLED}"
    pipe = TransfusionPipeline.from_pretrained(BUNDLED)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_bundled_checkpoint_is_small_and_self_contained():
    size = sum(f.stat().st_size for f in Path(BUNDLED).rglob("*") if f.is_file())
    assert size < 40 * 2**20, f"bundled checkpoint is {size / 2**20:.1f} MiB"
    assert len(list(Path(BUNDLED).rglob("*.safetensors"))) == 1


def test_bundled_checkpoint_generates_and_captions(pipe):
    out = pipe("a photo of a trouser", num_inference_steps=10, generator=torch.Generator().manual_seed(0), output_type="np")
    image = out.images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all() and image.std() > 0.05
    from training.data import load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    caption = pipe.caption(images[0])[0]
    assert caption.startswith("a photo of a"), caption


def test_bundled_checkpoint_continues_text(pipe):
    ids = pipe.tokenizer("Return the", return_tensors="pt")["input_ids"]
    out = pipe.transformer.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1]
