"""Tokenizer and processor: round trips, interleaving, padding, labels, errors, save/load."""

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoProcessor

from modeling_transfusion import TransfusionProcessor, build_tokenizer
from modeling_transfusion.processing_transfusion import prepare_image


def test_tokenizer_special_ids_and_round_trip(tokenizer):
    special = ["<|bos|>", "<|eos|>", "<|pad|>", "<|boi|>", "<|eoi|>", "<|image|>"]
    assert tokenizer.convert_tokens_to_ids(special) == list(range(6))
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
    # a solid red 50×20 image keeps its aspect: red (1, -1, -1) in the middle, black (-1) padding above and below
    torch.testing.assert_close(out["pixel_values"][0, :, 16, 16], torch.tensor([1.0, -1.0, -1.0]), atol=1e-2, rtol=0)
    torch.testing.assert_close(out["pixel_values"][0, :, 1, 16], torch.tensor([-1.0, -1.0, -1.0]), atol=1e-2, rtol=0)
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
        ([object()], r"A row is a string, an image .* Got \['object'\]"),
        (None, r"A row is a string, an image .* Got NoneType"),
        (5, r"A row is a string, an image .* Got int"),
        ({"text": "a"}, r"A row is a string, an image .* Got dict"),
        ([["a"], None], r"A row is a string, an image .* Got NoneType"),
        ([["a", 5]], r"A row is a string, an image .* Got \['str', 'int'\]"),
        ([torch.full((3, 8, 8), float("nan"))], r"image tensor contains NaN"),
        ([torch.full((3, 8, 8), 255.0)], r"image tensor must be \(3, H, W\) in \[-1, 1\], got values in \[255, 255\]"),
        ([np.zeros((8, 8, 5), np.uint8)], r"numpy image must be uint8 HW or HWC with 1, 3 or 4 channels"),
        ([PIL.Image.new("RGB", (0, 0))], r"image is empty \(size 0×0\)"),
        ([torch.zeros(3, 0, 0)], r"image is empty \(shape \(3, 0, 0\)\)"),
        (["a", torch.zeros(3, 32, 32)], None),
    ],
)
def test_bad_inputs_are_clear_errors(processor, bad, message):
    if message is None:  # a well-formed row for contrast: the cases above fail for their stated reason only
        assert processor(bad)["pixel_values"].shape == (1, 3, 32, 32)
        return
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


def test_exif_orientation_is_applied(processor):
    """A phone photo stored landscape with EXIF orientation 6 (display rotated 90° clockwise) is seen as displayed."""
    stored = PIL.Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (20, 0, 40, 20))  # right half red: turned 90° clockwise it becomes the bottom half
    exif = stored.getexif()
    exif[0x0112] = 6
    import io

    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
    photo = PIL.Image.open(io.BytesIO(buffer.getvalue()))
    image, steps = prepare_image(photo, 32)
    assert "rotated as its EXIF orientation says" in steps
    pixels = processor([photo])["pixel_values"][0]
    assert pixels[2, 4, 16] > 0.8 and pixels[0, 28, 16] > 0.8  # blue on top, red at the bottom
    assert (pixels[:, 16, 2] < -0.9).all()  # portrait now: padded left and right


def test_transparency_and_padding_use_the_background(processor):
    clear = PIL.Image.new("RGBA", (32, 16), (255, 255, 255, 0))  # fully transparent white
    image, steps = prepare_image(clear, 32)
    assert steps == ["transparency on black", "padded to a square"]
    assert np.asarray(image).max() == 0  # black, not white
    white = TransfusionProcessor(tokenizer=processor.tokenizer, image_size=32, image_slots=16,
                                 background=(255, 255, 255))
    assert white([clear])["pixel_values"].min() == 1.0


def test_latent_path_lays_out_the_same_sequence_without_pixels(processor):
    """`images_as_latents=True`: the same ids, mask and labels as for pixels; latents come back as image_latents."""
    latents = [torch.randn(4, 8, 8), torch.randn(4, 8, 8)]
    rows = [["a photo of a dress", latents[0], "and"], [latents[1], "short"]]
    pixel_rows = [["a photo of a dress", torch.zeros(3, 32, 32), "and"], [torch.zeros(3, 32, 32), "short"]]
    a = processor(rows, images_as_latents=True, add_eos=True, return_labels=True)
    b = processor(pixel_rows, add_eos=True, return_labels=True)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(a[key], b[key]), key
    assert "pixel_values" not in a and torch.equal(a["image_latents"], torch.stack(latents))
    with pytest.raises(ValueError, match=r"images_as_latents=True an image is a latent tensor \(C, h, w\)"):
        processor([PIL.Image.new("L", (8, 8))], images_as_latents=True)


def test_pad_and_labels_are_the_processors_own(processor):
    ids, mask = processor.pad([[7, 8, 9], [7]], padding_side="left")
    assert ids.tolist() == [[7, 8, 9], [2, 2, 7]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right', got 'middle'"):
        processor.pad([[7]], padding_side="middle")
    row = torch.tensor([[0, 3, 5, 5, 4, 9, 2]])
    assert processor.labels(row, torch.tensor([[1, 1, 1, 1, 1, 1, 0]])).tolist() == [[0, 3, -100, -100, -100, 9, -100]]
