"""The bundled checkpoints load offline: the base model produces an image and a caption (a fast smoke test); the
instruction-tuned one draws what a request asks for and edits a picture (judged by the shapes detector, over several
seeds so that no single sample decides)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT

from pipelines import TransfusionPipeline

BUNDLED = ROOT / "checkpoints" / "transfusion-tiny"
INSTRUCT = ROOT / "checkpoints" / "transfusion-tiny-instruct"


@pytest.fixture(scope="module")
def pipe():
    assert (BUNDLED / "model_index.json").exists(), f"the bundled checkpoint is missing at {BUNDLED}"
    pipe = TransfusionPipeline.from_pretrained(BUNDLED)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def instruct():
    pipe = TransfusionPipeline.from_pretrained(INSTRUCT)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("folder", [BUNDLED, INSTRUCT], ids=["base", "instruct"])
def test_bundled_checkpoint_is_small_and_self_contained(folder):
    size = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
    assert size < 40 * 2**20, f"bundled checkpoint is {size / 2**20:.1f} MiB"
    assert len(list(Path(folder).rglob("*.safetensors"))) == 1


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


def detected(image) -> list[tuple[str, str]]:
    """The (colour, shape) of every object the shapes detector finds in a uint8 image, sorted."""
    from evaluation.detector import detect

    return sorted((d.colour, d.shape) for d in detect(np.asarray(image, dtype=np.uint8)))


def test_instruct_checkpoint_answers_a_request_to_draw_with_the_picture(instruct):
    """At least 3 of 8 replies hold a red circle (the base model: 0 of 8; this one 6 of 8 on the machine that trained
    it, so a miss on another CPU's kernels is unlikely: below 1 % at a true rate of 0.75)."""
    hits = 0
    for seed in range(8):
        reply = instruct.chat([{"role": "user", "content": "please draw a red circle"}], num_inference_steps=10,
                          generator=torch.Generator().manual_seed(seed)).message  # fmt: skip
        images = [part for part in reply["content"] if not isinstance(part, str)]
        hits += bool(images) and ("red", "circle") in detected(images[0])
    assert hits >= 3, f"a red circle in {hits} of 8 replies"


@pytest.mark.parametrize(
    "objects, instruction, done",
    [
        ((("red", "circle", 4, 11), ("yellow", "square", 19, 11)), "remove the yellow square",
         lambda found: found == [("red", "circle")]),
        ((("green", "triangle", 4, 4), ("green", "triangle", 18, 18)), "add another green triangle",
         lambda found: found == [("green", "triangle")] * 3),
    ],
)
def test_instruct_checkpoint_edits_a_picture(instruct, objects, instruction, done):
    """The edit asked for, and nothing else, in at least 2 of 16 samples (the base model: 0 of 16; this one 6 and 10
    of 16 on the machine that trained it: below 1 % to miss at a true rate of 0.375)."""
    from training.datasets.instruct import PlacedObject, render_objects

    source = render_objects(tuple(PlacedObject(c, s, x, y, 10) for c, s, x, y in objects))
    edits = instruct([instruction] * 16, image=source, num_inference_steps=10, output_type="np",
                     generator=[torch.Generator().manual_seed(s) for s in range(16)]).images  # fmt: skip
    hits = sum(done(detected((e * 255).round().astype(np.uint8))) for e in edits)
    assert hits >= 2, f"{instruction!r} done in {hits} of 16 edits"
