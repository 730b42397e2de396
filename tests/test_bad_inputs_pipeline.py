"""Bad inputs to the pipeline — text→image, editing, caption(), generate_interleaved(), chat() and the saved folder:
each refused before any work with a message that names the argument and what is allowed (never an IndexError from
inside diffusers, a silent default, a NaN image or a minute of wasted sampling)."""

import json
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import tiny_model
from diffusers import DDIMScheduler

from pipelines import TransfusionPipeline

STEPS = r"num_inference_steps must be an integer in \[1, 1000\]"
GUIDANCE = r"guidance_scale must be a finite number ≥ 0 \(1 or less = no guidance\)"
IMAGES = r"num_images_per_prompt must be an integer in \[1, 64\]"
GENERATOR = r"generator must be a torch.Generator, or a list of 2 \(one per image\)"
TOKENS = r"max_new_tokens must be an integer in \[1, "
LONG = (r"is \d+ tokens long: with the \d+ positions? an image needs, it must be at most \d+ "
        r"\(max_position_embeddings=256\)")


@pytest.fixture(scope="module")
def pipe(tokenizer):
    model = tiny_model()
    pipe = TransfusionPipeline(
        transformer=model, scheduler=DDIMScheduler.from_config(model.config.scheduler_config()), tokenizer=tokenizer
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def works(pipe):
    """The pipeline still answers a normal request after the refused one."""
    out = pipe("a red circle", num_inference_steps=1, output_type="latent", generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.images).all()


# -- text → image ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"height": 0}, r"height=0: this model generates 32×32 images"),
        ({"width": -8}, r"width=-8: this model generates 32×32 images"),
        ({"height": "32"}, r"height must be an integer number of pixels \(32 for this model\), got '32'"),
        ({"width": 32.0}, r"width must be an integer number of pixels \(32 for this model\), got 32.0"),
        ({"num_inference_steps": True}, STEPS + ", got True"),
        ({"num_inference_steps": 0}, STEPS + ", got 0"),
        ({"num_inference_steps": 10000}, STEPS + ", got 10000"),
        ({"num_inference_steps": 2.0}, STEPS + ", got 2.0"),
        ({"guidance_scale": float("nan")}, GUIDANCE + ", got nan"),
        ({"guidance_scale": float("inf")}, GUIDANCE + ", got inf"),
        ({"guidance_scale": "3"}, GUIDANCE + ", got '3'"),
        ({"guidance_scale": None}, GUIDANCE + ", got None"),
        ({"guidance_scale": -1.0}, GUIDANCE + r", got -1.0"),
        ({"num_images_per_prompt": 1.5}, IMAGES + ", got 1.5"),
        ({"num_images_per_prompt": 1000}, IMAGES + r" \(call again for more\), got 1000"),
        ({"num_images_per_prompt": 0}, IMAGES + ", got 0"),
        ({"latents": torch.full((1, 4, 8, 8), float("nan"))}, r"latents contain NaN or infinite values"),
        ({"latents": np.zeros((1, 4, 8, 8), np.float32)},
         r"latents must be a torch.Tensor of shape \(1, 4, 8, 8\), got ndarray"),
        ({"generator": 0}, r"generator must be a torch.Generator, or a list of 1 \(one per image\), got int"),
        ({"negative_prompt": 5}, r"negative_prompt must be a string or a list of 1 strings?, got 5"),
        ({"negative_prompt": [None]}, r"negative_prompt must be a string or a list of 1 strings?, got \[None\]"),
        ({"prompt": 5}, r"prompt must be a non-empty string or list of strings, got 5"),
        ({"prompt": "a " * 2000}, r"prompt 0 " + LONG),
        ({"negative_prompt": "a " * 2000}, r"negative_prompt 0 " + LONG),
        ({"output_type": "jpeg"}, r"output_type must be one of 'pil', 'np', 'pt', 'latent', got 'jpeg'"),
        ({"callback_on_step_end": "print"}, r"callback_on_step_end must be callable"),
    ],
)
def test_text_to_image_bad_inputs(pipe, kwargs, message):
    kwargs = {"prompt": "a red circle", **kwargs}
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)
    works(pipe)


@pytest.mark.parametrize(
    "generator", [[torch.Generator()], [torch.Generator()] * 3, [0, 1], torch.Generator().manual_seed(0).seed()]
)
def test_generator_list_must_have_one_per_image(pipe, generator):
    with pytest.raises(ValueError, match=GENERATOR):
        pipe(["a", "b"], generator=generator, num_inference_steps=1)


def test_many_prompts_times_images_is_capped(pipe):
    with pytest.raises(ValueError,
                       match=r"40 prompts × num_images_per_prompt=2 = 80 images: one call makes at most 64"):
        pipe(["a"] * 40, num_images_per_prompt=2)


def test_bounds_are_inclusive(pipe):
    """The limits themselves are allowed: 1 step, guidance 0 (no guidance), 64 images per call."""
    assert pipe("a", num_inference_steps=1, guidance_scale=0.0, output_type="latent").images.shape[0] == 1
    out = pipe("a", num_inference_steps=1, num_images_per_prompt=64, guidance_scale=1.0, output_type="latent")
    assert out.images.shape[0] == 64


# -- caption ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "images, message",
    [
        (PIL.Image.new("RGB", (0, 0)), r"image is empty \(size 0×0\)"),
        (np.zeros((8, 8, 5), np.uint8),
         r"A numpy image must be uint8 HW or HWC with 1, 3 or 4 channels, got .* shape \(8, 8, 5\)"),
        (np.zeros((8, 8, 3), np.float32), r"A numpy image must be uint8 .* got dtype float32"),
        (torch.full((3, 32, 32), float("nan")), r"image tensor contains NaN or infinite values"),
        (torch.zeros(3, 0, 0), r"image is empty \(shape \(3, 0, 0\)\)"),
        (torch.zeros(5, 32, 32), r"An image tensor must be \(3, H, W\) in \[-1, 1\], got shape \(5, 32, 32\)"),
        ([PIL.Image.new("RGB", (8, 8)), None],
         r"images must be PIL images, uint8 arrays or \(3, H, W\) tensors in \[-1, 1\], got \['Image', 'NoneType'\]"),
        ([], r"caption\(\) needs at least one image"),
    ],
)
def test_caption_bad_images(pipe, images, message):
    with pytest.raises(ValueError, match=message):
        pipe.caption(images)
    assert isinstance(pipe.caption(PIL.Image.new("RGB", (8, 8)), max_new_tokens=2)[0], str)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 2.5}, TOKENS + r"\d+\] \(the positions left after the image\), got 2.5"),
        ({"max_new_tokens": "5"}, TOKENS + r"\d+\] \(the positions left after the image\), got '5'"),
        ({"max_new_tokens": 0}, TOKENS + r"\d+\] \(the positions left after the image\), got 0"),
        ({"max_new_tokens": 10**6}, TOKENS + r"\d+\] \(the positions left after the image\), got 1000000"),
        ({"prompt": 5}, r"prompt must be a string or None, got 5"),
        ({"prompt": "a " * 2000}, r"caption row 0 "
         + LONG.replace("with the \\d+ positions? an image needs, ", "").replace("at most", "shorter than")),
    ],
)
def test_caption_bad_arguments(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe.caption(PIL.Image.new("RGB", (8, 8)), **kwargs)


# -- interleaved ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": -1}, TOKENS),
        ({"max_new_tokens": 1.5}, TOKENS),
        ({"num_inference_steps": 0}, STEPS),
        ({"guidance_scale": float("nan")}, GUIDANCE),
        ({"temperature": -1.0}, r"temperature must be a finite number ≥ 0 \(0 = greedy\), got -1.0"),
        ({"temperature": float("nan")}, r"temperature must be a finite number ≥ 0 \(0 = greedy\), got nan"),
        ({"output_type": "jpeg"}, r"output_type must be one of 'pil', 'np', 'pt', 'latent', got 'jpeg'"),
        ({"max_images": -1}, r"max_images must be an integer ≥ 0, got -1"),
        ({"max_images": 1.5}, r"max_images must be an integer ≥ 0, got 1.5"),
        ({"generator": 3}, r"generator must be a torch.Generator or None, got int"),
        ({"prompt": "a " * 2000}, r"prompt row 0 is \d+ tokens long"),
        ({"prompt": 5},
         r"prompt must be a string, a list of strings and images \(one row\) or a list of rows, got int"),
    ],
)
def test_interleaved_bad_arguments(pipe, kwargs, message):
    kwargs = {"prompt": "a red circle", **kwargs}
    with pytest.raises(ValueError, match=message):
        pipe.generate_interleaved(**kwargs)
    assert pipe.generate_interleaved("a", max_new_tokens=1, max_images=0).items is not None


# -- editing ----------------------------------------------------------------------------------------------------------
SOURCE = np.zeros((32, 32, 3), np.uint8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image": "photo.png"}, r"image must be a PIL image, a uint8 array, a \(3, H, W\) tensor in \[-1, 1\], or a"),
        ({"image": []}, r"image must be a PIL image"),
        ({"image": [SOURCE, None]}, r"got \['ndarray', 'NoneType'\]"),
        ({"image": [SOURCE] * 3}, r"image: 3 images for 1 prompts; give one image, or one per prompt"),
        ({"image": SOURCE.astype(np.float32)}, r"A numpy image must be uint8"),
        ({"image": torch.ones(3, 32, 32) * 5}, r"An image tensor must be \(3, H, W\) in \[-1, 1\]"),
        ({"image": torch.full((3, 32, 32), float("nan"))}, r"NaN or infinite"),
        ({"image": SOURCE, "image_guidance_scale": float("nan")}, r"image_guidance_scale must be a finite number ≥ 0"),
        ({"image": SOURCE, "image_guidance_scale": "1.5"}, r"image_guidance_scale must be a finite number ≥ 0"),
        ({"image_guidance_scale": 1.5}, r"image_guidance_scale=1.5 guides towards the image to edit: pass image="),
        ({"image": SOURCE, "prompt": "a " * 400}, r"prompt 0 is \d+ tokens long: with the 16 positions"),
    ],
)
def test_edit_bad_inputs(pipe, kwargs, message):
    kwargs = {"prompt": "make it blue", **kwargs}
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs, num_inference_steps=1)
    works(pipe)


# -- chat -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "messages, message",
    [
        ("hello", r"messages must be a non-empty list of \{\"role\": \"user\" \| \"assistant\""),
        ([], r"messages must be a non-empty list"),
        ([{"role": "assistant", "content": "hi"}], r"ending with a user turn"),
        ([{"role": "user"}], r"message 0 of a conversation is \{'role': 'user'\}"),
        ([{"role": "user", "content": 3}], r"message 0 of a conversation is"),
        ([{"role": "bot", "content": "hi"}, {"role": "user", "content": "hi"}], r"message 0 of a conversation"),
        ([{"role": "user", "content": ["draw", "photo.png", {"image": "x"}]}], r"message 0 of a conversation"),
        ([{"role": "user", "content": "a " * 400}], r"prompt row 0 is \d+ tokens long"),
    ],
)
def test_chat_bad_conversations(pipe, messages, message):
    with pytest.raises(ValueError, match=message):
        pipe.chat(messages, max_new_tokens=2, num_inference_steps=1)
    assert pipe.chat([{"role": "user", "content": "hi"}], max_new_tokens=1, max_images=0).message["role"] == "assistant"


@pytest.mark.parametrize(
    "kwargs, message",
    [({"max_new_tokens": 0}, TOKENS), ({"image_guidance_scale": -2.0}, r"image_guidance_scale must be a finite number"),
     ({"max_images": -1}, r"max_images must be an integer ≥ 0")],
)
def test_chat_bad_arguments(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe.chat([{"role": "user", "content": "hi"}], **kwargs)


# -- the saved folder -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("saved") / "pipe"
    pipe.save_pretrained(root)
    return root


def damaged_copy(saved, tmp_path, change):
    root = tmp_path / "pipe"
    shutil.copytree(saved, root)
    change(root)
    return root


def edit_json(path, **values):
    data = json.loads(path.read_text())
    data.update(values)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda r: edit_json(r / "transformer" / "config.json", model_type="llama"), ValueError,
         r"transformer/config.json has model_type 'llama': "
         r"this is not a Transfusion model \(model_type 'transfusion'\)"),
        (lambda r: edit_json(r / "scheduler" / "scheduler_config.json", _class_name="NoSuchScheduler"), ValueError,
         r"scheduler/scheduler_config.json names the scheduler class 'NoSuchScheduler', which diffusers does not have"),
        (lambda r: (r / "tokenizer" / "tokenizer.json").write_text("{ not json"), ValueError,
         r"tokenizer/tokenizer.json cannot be read"),
        (lambda r: shutil.rmtree(r / "tokenizer"), FileNotFoundError, r"has no tokenizer folder"),
        (lambda r: shutil.rmtree(r / "scheduler"), FileNotFoundError, r"has no scheduler folder"),
        (lambda r: (r / "model_index.json").unlink(), FileNotFoundError,
         r"has no model_index.json: it is not a saved pipeline folder"),
        (lambda r: (r / "model_index.json").write_text("[1, 2"), ValueError, r"model_index.json cannot be read"),
    ],
)
def test_damaged_folders_name_the_file(saved, tmp_path, change, error, message):
    root = damaged_copy(saved, tmp_path, change)
    with pytest.raises(error, match=message):
        TransfusionPipeline.from_pretrained(root)


def test_missing_folder_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no-such-pipe is not a folder"):
        TransfusionPipeline.from_pretrained(str(tmp_path / "no-such-pipe"))
