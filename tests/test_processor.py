"""Tokenizer and processor: round trips, interleaving, padding, labels, errors, save/load."""

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoProcessor

from modeling_transfusion import TransfusionProcessor, build_tokenizer


def test_tokenizer_special_ids_and_round_trip(tokenizer):
    assert tokenizer.convert_tokens_to_ids(["<|bos|>", "<|eos|>", "<|pad|>", "<|boi|>", "<|eoi|>", "<|image|>"]) == list(
        range(6)
    )
    text = "A naïve café — 42 ✓ unseen-wörds"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_tokenizer_vocab_too_small_is_an_error():
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        build_tokenizer(["abc"], vocab_size=100)


def test_interleaved_row_layout(processor):
    img = PIL.Image.new("RGB", (50, 20), (255, 0, 0))
    out = processor(["a photo of a dress", img, "two green triangles"], add_eos=True, return_labels=True)
    ids = out["input_ids"][0].tolist()
    text = processor.encode_text("a photo of a dress")
    assert ids[: 1 + len(text)] == [0, *text]
    boi = 1 + len(text)
    assert ids[boi] == 3 and ids[boi + 1 : boi + 17] == [5] * 16 and ids[boi + 17] == 4
    assert ids[-1] == 1
    assert out["pixel_values"].shape == (1, 3, 32, 32)
    # a solid red image maps to (1, -1, -1) after resizing
    torch.testing.assert_close(out["pixel_values"][0, :, 5, 5], torch.tensor([1.0, -1.0, -1.0]), atol=1e-2, rtol=0)
    labels = out["labels"][0]
    assert (labels[boi + 1 : boi + 18] == -100).all() and labels[boi] == 3


def test_user_text_cannot_inject_image_slots(processor):
    out = processor(["describe <|image|><|boi|> please"])
    assert not (out["input_ids"] == 5).any() and not (out["input_ids"] == 3).any()


def test_batch_padding_sides_and_several_images(processor):
    img = np.zeros((28, 28), dtype=np.uint8)
    rows = [["a photo of a dress", img, "and", img], ["short"]]
    right = processor(rows, padding_side="right", return_labels=True)
    left = processor(rows, padding_side="left")
    assert right["pixel_values"].shape == (2, 3, 32, 32)
    lengths = right["attention_mask"].sum(-1)
    assert right["input_ids"][1, lengths[1] :].eq(2).all() and left["input_ids"][1, : -lengths[1]].eq(2).all()
    assert torch.equal(right["input_ids"][1, : lengths[1]], left["input_ids"][1, -lengths[1] :])
    assert (right["labels"][right["attention_mask"] == 0] == -100).all()


def test_append_boi_makes_a_generation_prompt(processor):
    out = processor(["a red circle", "two green triangles"], append_boi=True, padding_side="left")
    assert out["input_ids"][:, -1].eq(3).all()


@pytest.mark.parametrize(
    "bad, message",
    [
        ([], "Nothing to encode"),
        ([PIL.Image.new("I;16", (8, 8))], "Unsupported image mode 'I;16'"),
        ([np.zeros((8, 8), dtype=np.float32)], "numpy image must be uint8"),
        ([torch.zeros(1, 8, 8)], r"image tensor must be \(3, H, W\)"),
        ([object()], "Unsupported image type object"),
    ],
)
def test_bad_inputs_are_clear_errors(processor, bad, message):
    with pytest.raises(ValueError, match=message):
        processor(bad)


def test_processor_save_load_auto(tmp_path, processor):
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, TransfusionProcessor)
    assert (loaded.image_size, loaded.image_slots) == (processor.image_size, processor.image_slots)
    row = ["a photo of a dress", PIL.Image.new("L", (28, 28), 128)]
    a, b = processor(row), loaded(row)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])


def test_processor_uses_the_tokenizers_declared_bos_eos_pad(tokenizer):
    """A converted Llama tokenizer keeps <s> and </s>: the processor must take them from the tokenizer."""
    import copy

    other = copy.deepcopy(tokenizer)
    other.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
    processor = TransfusionProcessor(tokenizer=other, image_size=32, image_slots=16)
    out = processor(["a photo of a dress"], add_eos=True)
    assert out["input_ids"][0, 0] == other.convert_tokens_to_ids("<s>")
    assert out["input_ids"][0, -1] == other.convert_tokens_to_ids("</s>")
