"""diffusers' pipeline contracts, as its `PipelineTesterMixin` / `PipelineLatentTesterMixin` check them, held here so CI
keeps them without diffusers' repository (tests/dev_diffusers_pipeline_mixin.py runs the mixins themselves).
Contracts already held in tests/test_pipeline.py: dict/tuple outputs, variants save/load, a per-component
`torch_dtype` dict, CFG-cutoff callbacks and `num_timesteps`, progress bar, offload declarations."""

import inspect
import logging

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.utils import logging as diffusers_logging
from test_pipeline import gen, make_pipe

from pipelines import TransfusionPipeline

# diffusers' TEXT_TO_IMAGE_PARAMS without prompt embeddings (the transformer prefills the prompt itself)
PARAMS = {"prompt", "height", "width", "guidance_scale", "negative_prompt"}
REQUIRED_OPTIONAL = {"num_inference_steps", "num_images_per_prompt", "generator", "latents", "output_type",
                     "return_dict"}  # fmt: skip


@pytest.fixture()
def pipe(tokenizer):
    return make_pipe(tokenizer, max_position_embeddings=1024)


def inputs(**overrides):
    return {"prompt": "a red circle to the left of a blue square", "generator": gen(0), "num_inference_steps": 2,
            "guidance_scale": 3.0, "output_type": "np", **overrides}  # fmt: skip


def test_pipeline_call_signature():
    parameters = inspect.signature(TransfusionPipeline.__call__).parameters
    assert PARAMS <= set(parameters)
    assert all(parameters[name].default is not inspect.Parameter.empty for name in REQUIRED_OPTIONAL)
    assert {"callback_on_step_end", "callback_on_step_end_tensor_inputs"} <= set(parameters)


def test_components_function(pipe):
    assert set(pipe.components) == {"transformer", "scheduler", "tokenizer"}
    assert pipe.components["transformer"] is pipe.transformer
    assert TransfusionPipeline._optional_components == []  # diffusers' optional-components test has nothing to check


def test_inference_batch_single_identical(pipe):
    """diffusers' batch: the prompt, its first half, then a 900-character prompt, one generator each; the first image
    equals the single run (left padding and the other rows change nothing)."""
    prompt = inputs()["prompt"]
    batch = [prompt, prompt[: len(prompt) // 2], 100 * "very long"]
    single = pipe(**inputs())[0]
    batched = pipe(**inputs(prompt=batch, generator=[gen(i) for i in range(3)]))[0]
    assert batched.shape[0] == 3
    assert np.abs(batched[0] - single[0]).max() < 1e-4
    assert len(pipe(**inputs(prompt=batch[:2], generator=[gen(0), gen(1)]))[0]) == 2  # batch consistent


@pytest.mark.parametrize("batch, per_prompt", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_num_images_per_prompt(pipe, batch, per_prompt):
    images = pipe(**inputs(prompt=[inputs()["prompt"]] * batch, generator=None), num_images_per_prompt=per_prompt)[0]
    assert images.shape == (batch * per_prompt, 32, 32, 3)


def test_cfg_keeps_the_output_shape(pipe):
    assert pipe(**inputs(guidance_scale=1.0))[0].shape == pipe(**inputs(guidance_scale=7.5))[0].shape


def test_pt_np_pil_outputs_equivalent(pipe):
    pt = pipe(**inputs(output_type="pt"))[0]
    np_ = pipe(**inputs(output_type="np"))[0]
    pil = pipe(**inputs(output_type="pil"))[0]
    assert np.abs(pt.numpy().transpose(0, 2, 3, 1) - np_).max() < 1e-4
    assert np.abs(np.array(pil[0]).astype(float) - (np_[0] * 255).round()).max() < 2.0


def test_callback_inputs(pipe):
    """The callback gets only the tensors it asked for, all of `_callback_tensor_inputs` when it asks for all, and
    latents it replaces at the last step (`i == pipe.num_timesteps - 1`) are what the pipeline returns."""

    def subset(p, i, t, kwargs):
        assert set(kwargs) <= set(p._callback_tensor_inputs)
        return kwargs

    def every(p, i, t, kwargs):
        assert set(kwargs) == set(p._callback_tensor_inputs)
        return kwargs

    def zero_last(p, i, t, kwargs):
        if i == p.num_timesteps - 1:
            kwargs["latents"] = torch.zeros_like(kwargs["latents"])
        return kwargs

    kwargs = inputs(output_type="latent", callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs)
    pipe(**{**kwargs, "callback_on_step_end": subset, "callback_on_step_end_tensor_inputs": ["latents"]})
    pipe(**{**kwargs, "callback_on_step_end": every})
    assert pipe(**{**kwargs, "callback_on_step_end": zero_last})[0].abs().sum() == 0


def test_callback_cfg_increasing_guidance(pipe):
    def increase(p, i, t, kwargs):
        p._guidance_scale += 1.0
        return kwargs

    pipe(**inputs(guidance_scale=2.0, callback_on_step_end=increase,
                  callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs))  # fmt: skip
    assert pipe.guidance_scale == 2.0 + pipe.num_timesteps


def test_to_dtype(pipe):
    assert pipe.transformer.dtype == torch.float32
    pipe.to(dtype=torch.float16)
    assert pipe.transformer.dtype == torch.float16 and pipe.vae.dtype == torch.float16


def test_save_load_local_pickled_and_logged(tmp_path, pipe):
    """`safe_serialization=False` round-trips too, and diffusers' loader logs every component it loads."""
    out = pipe(**inputs())[0]
    pipe.save_pretrained(tmp_path, safe_serialization=False)
    logger = diffusers_logging.get_logger("diffusers.pipelines.pipeline_utils")
    logger.setLevel(logging.INFO)
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    try:
        loaded = TransfusionPipeline.from_pretrained(tmp_path)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.WARNING)
    assert all(any(name in r for r in records) for name in loaded.components)
    loaded.set_progress_bar_config(disable=True)
    assert np.abs(loaded(**inputs())[0] - out).max() < 5e-4
    for a, b in zip(pipe.transformer.state_dict().values(), loaded.transformer.state_dict().values()):
        assert torch.equal(a, b)


def test_loading_with_incorrect_variant_raises(tmp_path, pipe):
    pipe.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="You are trying to load the model files of the `variant=fp16`"):
        TransfusionPipeline.from_pretrained(tmp_path, variant="fp16")


def test_dtype_alias_and_dtype_dict(tmp_path, pipe):
    """diffusers' newer `dtype=` (alias of `torch_dtype=`), also as a per-component dict with a default."""
    pipe.save_pretrained(tmp_path)
    assert TransfusionPipeline.from_pretrained(tmp_path, dtype=torch.float16).transformer.dtype == torch.float16
    dtypes = {"transformer": torch.bfloat16, "default": torch.float16}
    mixed = TransfusionPipeline.from_pretrained(tmp_path, dtype=dtypes)
    assert mixed.transformer.dtype == torch.bfloat16 and mixed.vae.dtype == torch.bfloat16


def test_device_map_load_equals(tmp_path, pipe):
    out = pipe(**inputs())[0]
    pipe.save_pretrained(tmp_path)
    loaded = TransfusionPipeline.from_pretrained(tmp_path, device_map="cpu")
    loaded.set_progress_bar_config(disable=True)
    assert np.abs(loaded(**inputs())[0] - out).max() < 1e-4
    assert isinstance(loaded.scheduler, DDIMScheduler)
