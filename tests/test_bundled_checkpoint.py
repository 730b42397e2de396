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
    out = pipe("a photo of a trouser", num_inference_steps=10, generator=torch.Generator().manual_seed(0),
               output_type="np")
    image = out.images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all() and image.std() > 0.05
    from training.datasets import load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    caption = pipe.caption(images[0])[0]
    assert caption.startswith("a photo of a"), caption


def test_bundled_checkpoint_continues_text(pipe):
    ids = pipe.tokenizer("Return the", return_tensors="pt")["input_ids"]
    out = pipe.transformer.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1]


def test_text_generation_stops_where_an_image_begins(pipe):
    """`generate()` on a caption-shaped prompt: the model emits <|boi|>, and text-only decoding ends there (its
    generation config stops at <|eos|> and <|boi|>) instead of writing unrelated text after a hidden <|boi|>."""
    from transformers import pipeline

    model, tokenizer, c = pipe.transformer, pipe.tokenizer, pipe.transformer.config
    assert c.boi_token_id in model.generation_config.eos_token_id
    ids = torch.tensor([[c.bos_token_id, *tokenizer("a photo of a dress", add_special_tokens=False)["input_ids"]]])
    out = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :].tolist()
    assert c.boi_token_id in out, tokenizer.decode(out)
    assert out.index(c.boi_token_id) == len(out) - 1, tokenizer.decode(out)  # nothing after it

    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    outputs = generator("a photo of a dress", max_new_tokens=12, do_sample=False, return_full_text=False)
    text = outputs[0]["generated_text"]
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) < 12, text  # stopped early, at the image
