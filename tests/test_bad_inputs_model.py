"""Bad inputs to the model and its checkpoints: each refused with a message that names the argument and what is
allowed (never a trace from inside torch, never a silent NaN)."""

import json

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file

from modeling_transfusion import TransfusionConfig, TransfusionForCausalLM

IMG = 5


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def image_row(c):
    return torch.tensor([[c.bos_token_id, 10, c.boi_token_id] + [IMG] * c.image_slots + [c.eoi_token_id, 11]])


@pytest.mark.parametrize(
    "ids, message",
    [
        (torch.tensor([[0.0, 10.0]]), r"input_ids must be a 2-D integer tensor .* torch.float32"),
        (torch.tensor([0, 10, 11]), r"input_ids must be a 2-D integer tensor .* shape \(3,\)"),
        ([[0, 10, 11]], r"input_ids must be a 2-D integer tensor .* list"),
        (torch.zeros(1, 0, dtype=torch.long), r"input_ids / inputs_embeds are empty"),
        (torch.tensor([[0, 300]]), r"outside the vocabulary \[0, 300\)"),
    ],
)
def test_bad_input_ids(model, ids, message):
    with pytest.raises(ValueError, match=message):
        model(input_ids=ids)


def test_attention_mask_of_the_wrong_length_or_batch(model):
    ids = torch.tensor([[0, 10, 11]])
    masks = (torch.ones(1, 2, dtype=torch.long), torch.ones(2, 3, dtype=torch.long), torch.ones(3, dtype=torch.long))
    for mask in masks:
        with pytest.raises(ValueError,
                           match=r"attention_mask must have shape \(batch, cached \+ new tokens\) = \(1, 3\)"):
            model(input_ids=ids, attention_mask=mask)


def test_images_that_are_nan_out_of_range_or_at_bad_timesteps(model):
    c = model.config
    ids = image_row(c)
    with pytest.raises(ValueError, match="image_latents contain NaN or infinite values"):
        model(input_ids=ids, image_latents=torch.full((1, 4, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="pixel_values contain NaN"):
        model(input_ids=ids, pixel_values=torch.full((1, 3, 32, 32), float("nan")))
    with pytest.raises(ValueError, match=r"pixel_values must lie in \[-1, 1\] .* got values in \[0, 255\]"):
        model(input_ids=ids, pixel_values=torch.cat([torch.zeros(1, 3, 16, 32), torch.full((1, 3, 16, 32), 255.0)], 2))
    for t in (torch.tensor([-1.0]), torch.tensor([float("nan")]), torch.tensor([1001.0])):
        with pytest.raises(ValueError, match=r"image_timesteps must lie in \[0, 1000\]"):
            model(input_ids=ids, image_latents=torch.zeros(1, 4, 8, 8), image_timesteps=t)


@pytest.mark.parametrize(
    "labels, message",
    [
        (torch.tensor([[0, 10]]), r"labels must be an integer tensor of the shape of input_ids \(1, 3\)"),
        (torch.tensor([[0.0, 10.0, 11.0]]), r"labels must be an integer tensor .* torch.float32"),
        (torch.tensor([[0, 10, 11], [0, 10, 11]]), r"labels must be an integer tensor .* \(2, 3\)"),
        (torch.tensor([[0, 10, 999]]),
         r"labels hold \[999\]: each must be -100 \(no loss\) or a token id in \[0, 300\)"),
        (torch.tensor([[0, -5, 11]]), r"labels hold \[-5\]"),
    ],
)
def test_bad_labels(model, labels, message):
    with pytest.raises(ValueError, match=message):
        model(input_ids=torch.tensor([[0, 10, 11]]), labels=labels)


def test_invalid_config_values_are_refused():
    for field, value in (("num_hidden_layers", -1), ("num_hidden_layers", 0), ("hidden_size", 0), ("vocab_size", 2),
                         ("max_position_embeddings", 0), ("num_attention_heads", 0),
                         ("intermediate_size", -3)):  # fmt: skip
        with pytest.raises(ValueError, match=rf"TransfusionConfig.{field}={value!r} is invalid"):
            TransfusionConfig.from_preset("tiny", **{field: value})


def test_missing_folder_and_missing_config_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing is not a folder"):
        TransfusionForCausalLM.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty has no config.json"):
        TransfusionForCausalLM.from_pretrained(tmp_path / "empty")


def test_a_flipped_byte_that_makes_nan_weights_is_named(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError,
                       match=r"NaN or infinite values in model.layers.1.mlp.up_proj.weight .*model.safetensors"):
        TransfusionForCausalLM.from_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "transfusion"
