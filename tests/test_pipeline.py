"""TransfusionPipeline: equivalences with direct model calls, CFG, seeds, schedulers, captioning, interleaving,
one-folder save/load, and input errors."""

import inspect
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import tiny_model
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from transformers import DynamicCache

from pipelines import TransfusionPipeline


def make_pipe(tokenizer, scheduler_class=DDIMScheduler, **model_overrides):
    model = tiny_model(**model_overrides)
    scheduler = scheduler_class.from_config(model.config.scheduler_config())
    pipe = TransfusionPipeline(transformer=model, scheduler=scheduler, tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture()
def pipe(tokenizer):
    return make_pipe(tokenizer)


def test_vae_is_the_models_vae(pipe):
    assert pipe.vae is pipe.transformer.model.vae


def test_one_step_equals_direct_model_call(pipe):
    """A 1-step, no-guidance run: the scheduler step on the model's own prediction for the same inputs."""
    c = pipe.transformer.config
    noise = torch.randn(1, 4, 8, 8, generator=gen(0))
    out = pipe("a photo of a dress", num_inference_steps=1, guidance_scale=1.0, latents=noise, output_type="latent")
    ids = torch.tensor([[c.bos_token_id, *pipe.processor.encode_text("a photo of a dress"), c.boi_token_id] + [5] * 16])
    reference = DDIMScheduler.from_config(pipe.scheduler.config)
    reference.set_timesteps(1)
    t = reference.timesteps[0]
    pred = pipe.transformer(input_ids=ids, image_latents=noise, image_timesteps=t.reshape(1)).image_predictions
    expected = reference.step(pred, t, noise).prev_sample
    torch.testing.assert_close(out.images, expected, atol=1e-5, rtol=1e-5)


def uncached_sampling(pipe, prompt, noise, steps, guidance, scheduler=None, generator=None):
    """Reference written the way diffusers pipelines sample: timesteps first, noise × init_noise_sigma,
    scale_model_input, and the whole sequence (prefix + image) recomputed at every step, no cache."""
    c = pipe.transformer.config
    ids, mask = pipe.encode_prompt([prompt], None, guidance > 1)
    ids = torch.cat([ids, torch.full((ids.shape[0], c.image_slots), c.image_token_id)], dim=1)
    mask = torch.cat([mask, torch.ones(ids.shape[0], c.image_slots, dtype=torch.long)], dim=1)
    scheduler = scheduler or DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    latents = noise.clone() * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        latent_in = scheduler.scale_model_input(torch.cat([latents] * ids.shape[0]), t)
        pred = pipe.transformer(
            input_ids=ids, attention_mask=mask, image_latents=latent_in, image_timesteps=t.repeat(ids.shape[0])
        ).image_predictions
        if guidance > 1:
            cond, uncond = pred.chunk(2)
            pred = uncond + guidance * (cond - uncond)
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        latents = scheduler.step(pred, t, latents, **step_kwargs).prev_sample
    return latents


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_cached_denoising_equals_uncached(pipe, guidance):
    noise = torch.randn(1, 4, 8, 8, generator=gen(1))
    cached = pipe("two green triangles", num_inference_steps=4, guidance_scale=guidance, latents=noise, output_type="latent")
    reference = uncached_sampling(pipe, "two green triangles", noise, 4, guidance)
    torch.testing.assert_close(cached.images, reference, atol=1e-5, rtol=1e-5)


def test_guidance_one_equals_conditional_branch_of_a_guided_batch(pipe):
    """With the doubled (conditional + unconditional, left-padded) batch at scale 1, the result is the
    conditional prediction alone: padding and the second row change nothing."""
    noise = torch.randn(1, 4, 8, 8, generator=gen(2))
    plain = pipe("a photo of a dress", num_inference_steps=3, guidance_scale=1.0, latents=noise, output_type="latent")
    ids, mask = pipe.encode_prompt(["a photo of a dress"], ["a much longer negative prompt here"], do_cfg=True)
    timesteps = pipe._start_sampling(1.0, 3)
    # a doubled prefix at scale 1: the loop drops the unconditional rows, the result is the conditional branch
    guided = pipe.denoise([pipe.prefill(ids, mask)], noise.clone(), timesteps)
    torch.testing.assert_close(guided, plain.images, atol=1e-5, rtol=1e-5)
    pipe._start_sampling(1.0, 3)
    pipe._guidance_scale = 1.5  # keeps both rows; 1 + 0.5·(cond − uncond) moves away from the conditional branch
    assert not torch.allclose(pipe.denoise([pipe.prefill(ids, mask)], noise.clone(), timesteps), plain.images)


def test_seeds_are_deterministic_and_distinct(pipe):
    a = pipe("a red circle", num_inference_steps=3, generator=gen(0), output_type="np").images
    b = pipe("a red circle", num_inference_steps=3, generator=gen(0), output_type="np").images
    c = pipe("a red circle", num_inference_steps=3, generator=gen(1), output_type="np").images
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


def test_batch_of_two_prompts_equals_singles(pipe):
    prompts = ["a red circle", "two green triangles to the left"]
    batch = pipe(prompts, num_inference_steps=3, generator=[gen(0), gen(1)], output_type="latent").images
    for i, p in enumerate(prompts):
        single = pipe(p, num_inference_steps=3, generator=gen(i), output_type="latent").images
        torch.testing.assert_close(batch[i : i + 1], single, atol=1e-5, rtol=1e-5)


def test_num_images_per_prompt_and_output_types(pipe):
    out = pipe(["a", "b"], num_images_per_prompt=2, num_inference_steps=2, generator=gen(0))
    assert len(out.images) == 4 and out.images[0].size == (32, 32)
    pt = pipe("a", num_inference_steps=2, output_type="pt").images
    assert pt.shape == (1, 3, 32, 32) and 0 <= pt.min() and pt.max() <= 1
    assert pipe("a", num_inference_steps=2, return_dict=False)[0][0].size == (32, 32)


def test_callback_on_step_end_sees_and_can_replace_latents(pipe):
    seen = []

    def callback(p, i, t, kwargs):
        seen.append(i)
        return {"latents": torch.zeros_like(kwargs["latents"])}

    out = pipe("a", num_inference_steps=3, callback_on_step_end=callback, output_type="latent").images
    assert seen == [0, 1, 2] and out.abs().max() == 0


EPSILON_SCHEDULERS = {  # every diffusers family that samples an ε-prediction model, with the config it needs
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-ancestral": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "kdpm2": (KDPM2DiscreteScheduler, {}),
    "kdpm2-ancestral": (KDPM2AncestralDiscreteScheduler, {}),
    "deis": (DEISMultistepScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "dpm++-sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    "dpm-singlestep": (DPMSolverSinglestepScheduler, {}),
}


@pytest.mark.parametrize("name", sorted(EPSILON_SCHEDULERS))
def test_every_scheduler_family_samples_as_diffusers_pipelines_do(pipe, name):
    """The cached pipeline equals a reference loop written as diffusers pipelines sample (timesteps before the
    noise is scaled, scale_model_input, only the step arguments the scheduler takes), with guidance, for every
    ε-prediction family: Euler-type noise scaled before set_timesteps, or a generator passed to PNDM/LMS/Heun/…,
    fails here."""
    cls, overrides = EPSILON_SCHEDULERS[name]
    pipe.scheduler = cls.from_config(pipe.transformer.config.scheduler_config(), **overrides)
    noise = torch.randn(1, 4, 8, 8, generator=gen(4))
    out = pipe("a red circle", num_inference_steps=5, guidance_scale=3.0, latents=noise, generator=gen(5),
               output_type="latent").images  # fmt: skip
    reference = cls.from_config(pipe.scheduler.config)
    expected = uncached_sampling(pipe, "a red circle", noise, 5, 3.0, scheduler=reference, generator=gen(5))
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "scheduler_class", [DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler]
)
def test_samplers_built_from_the_model_config_skip_the_signal_free_last_timestep(pipe, scheduler_class):
    """Every sampler spaces its steps the same way ("leading"), whatever its own default: none starts at t = 999."""
    scheduler = scheduler_class.from_config(pipe.transformer.config.scheduler_config())
    scheduler.set_timesteps(20)
    assert int(scheduler.timesteps[0]) <= 950, scheduler.timesteps[:3]  # "linspace"/"trailing" start at 999


def test_flow_matching_model_samples_with_flow_scheduler(tokenizer):
    pipe = make_pipe(tokenizer, FlowMatchEulerDiscreteScheduler, diffusion_type="flow_matching", prediction_type="flow")
    images = pipe("a red circle", num_inference_steps=4, generator=gen(0), output_type="np").images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_clean_pass_cache_equals_recompute(pipe):
    """prefill → denoise → append_image, then `<|eoi|>`: the cache and the next-token logits equal one forward of
    the whole row with the clean image."""
    c = pipe.transformer.config
    ids, mask = pipe.encode_prompt(["a photo of a dress"], None, do_cfg=True)
    noise = torch.randn(1, 4, 8, 8, generator=gen(3))
    timesteps = pipe._start_sampling(3.0, 3)
    prefix = pipe.prefill(ids, mask)
    latents = pipe.denoise([prefix], noise, timesteps)
    prefix.cache.batch_select_indices(torch.arange(1))
    cond = pipe.append_image(type(prefix)(prefix.cache, mask[:1]), latents)
    eoi = torch.tensor([[c.eoi_token_id]])
    logits = pipe.transformer(input_ids=eoi, attention_mask=torch.cat([cond.mask, torch.ones_like(eoi)], 1),
                              past_key_values=cond.cache, use_cache=True).logits[:, -1]  # fmt: skip
    cond_ids = ids[:1, mask[0].bool()]  # the conditional row without its padding
    full_ids = torch.cat([cond_ids, torch.full((1, c.image_slots), 5), eoi], dim=1)
    fresh = DynamicCache(config=c)
    out = pipe.transformer(input_ids=full_ids, image_latents=latents, past_key_values=fresh, use_cache=True)
    torch.testing.assert_close(logits, out.logits[:, -1], atol=1e-5, rtol=1e-5)
    pad = ids.shape[1] - cond_ids.shape[1]
    for layer_cached, layer_fresh in zip(cond.cache.layers, fresh.layers):
        torch.testing.assert_close(layer_cached.keys[:, :, pad:], layer_fresh.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer_cached.values[:, :, pad:], layer_fresh.values, atol=1e-5, rtol=1e-5)


def test_captioning_matches_generate_with_images(pipe, processor):
    images = [PIL.Image.new("L", (28, 28), 200), np.zeros((40, 40, 3), dtype=np.uint8)]
    captions = pipe.caption(images, max_new_tokens=5)
    assert len(captions) == 2 and all(isinstance(s, str) for s in captions)
    inputs = processor([images[0]])
    out = pipe.transformer.generate(**inputs, max_new_tokens=5, do_sample=False, bad_words_ids=[[3], [5]])
    assert pipe.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip() == captions[0]


class ScriptedHead(torch.nn.Module):
    """Wraps lm_head: forces a scripted token sequence so the interleaved loop can be tested on a random model."""

    def __init__(self, head, script):
        super().__init__()
        self.head, self.script, self.calls = head, list(script), 0

    def forward(self, hidden):
        logits = self.head(hidden)
        if self.calls < len(self.script):
            logits[:, -1, self.script[self.calls]] += 1e4
        self.calls += 1
        return logits


def test_interleaved_generation_emits_text_image_text(pipe):
    c = pipe.transformer.config
    text = pipe.processor.encode_text("a photo")
    # head calls: the prompt's prefill (ignored); generate → text[0], text[1], <|boi|>; <|boi|> into the cache;
    # 3 denoising steps; the clean image; generate from <|eoi|> → text[0], <|eos|>
    pipe.transformer.lm_head = ScriptedHead(pipe.transformer.lm_head, [])
    script = [0, text[0], text[1], c.boi_token_id, 0] + [0] * 3 + [0, text[0], c.eos_token_id]
    pipe.transformer.lm_head.script = script
    result = pipe.generate_interleaved("hello", max_new_tokens=10, num_inference_steps=3, guidance_scale=1.0)
    kinds = [type(x).__name__ for x in result.items]
    assert kinds == ["str", "Image", "str"], result.items
    assert result.items[0] == pipe.tokenizer.decode(text[:2])
    ids = result.token_ids[0].tolist()
    boi = ids.index(c.boi_token_id)
    assert ids[boi + 1 : boi + 17] == [5] * 16 and ids[boi + 17] == c.eoi_token_id


def test_save_load_round_trip_in_process(tmp_path, pipe):
    pipe.save_pretrained(tmp_path)
    loaded = TransfusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is DDIMScheduler
    a = pipe("a red circle", num_inference_steps=3, generator=gen(0), output_type="latent").images
    b = loaded("a red circle", num_inference_steps=3, generator=gen(0), output_type="latent").images
    # loaded weights are memory-mapped: another alignment can pick another float32 kernel (~1e-7 on some CPUs)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 1  # weights stored once (the VAE lives in the model)


def test_save_load_remote_code_in_fresh_process(tmp_path, pipe):
    pipe.save_pretrained(tmp_path / "pipe")
    expected = pipe("a red circle", num_inference_steps=3, generator=gen(0), output_type="latent").images
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import importlib.util, torch
        torch.set_num_threads(1)
        assert importlib.util.find_spec("modeling_transfusion") is None
        assert importlib.util.find_spec("pipelines") is None
        from diffusers import DiffusionPipeline
        from transformers import AutoModelForCausalLM, AutoProcessor
        root = {str(tmp_path / "pipe")!r}
        pipe = DiffusionPipeline.from_pretrained(root, trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        assert pipe.vae is pipe.transformer.model.vae
        out = pipe("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="latent")
        torch.testing.assert_close(out.images, torch.load({str(tmp_path / "expected.pt")!r}), atol=1e-6, rtol=0)
        model = AutoModelForCausalLM.from_pretrained(root + "/transformer", trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(root + "/transformer", trust_remote_code=True)
        inputs = processor(["a red circle", torch.zeros(3, 32, 32)])
        assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]
        print("REMOTE-PIPELINE-OK")
        """
    )
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "REMOTE-PIPELINE-OK" in res.stdout, res.stderr[-3000:]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt": []}, "prompt must be a non-empty string or list"),
        ({"prompt": "a", "height": 30}, "height=30 is off the patch grid: it must be a multiple of 8"),
        ({"prompt": "a", "width": 64}, "width=64: this model generates 32×32 images"),
        ({"prompt": "a", "num_inference_steps": 0}, "num_inference_steps must be a positive integer"),
        ({"prompt": "a", "guidance_scale": -1.0}, "guidance_scale must be ≥ 0"),
        ({"prompt": "a", "latents": torch.zeros(1, 4, 4, 4)}, r"latents must have shape \(1, 4, 8, 8\)"),
        ({"prompt": "a", "output_type": "jpeg"}, "output_type must be one of"),
    ],
)
def test_bad_inputs_are_clear_errors(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)


def test_caption_bad_inputs_are_clear_errors(pipe):
    with pytest.raises(ValueError, match="Unsupported image mode 'F'"):
        pipe.caption(PIL.Image.new("F", (8, 8)))
    with pytest.raises(ValueError, match="at least one image"):
        pipe.caption([])


def test_negative_prompt_string_equals_one_per_prompt(pipe):
    kwargs = dict(num_inference_steps=2, num_images_per_prompt=2, output_type="latent")
    one = pipe(["a", "b"], negative_prompt="blurry", generator=[gen(i) for i in range(4)], **kwargs).images
    listed = pipe(["a", "b"], negative_prompt=["blurry", "blurry"], generator=[gen(i) for i in range(4)], **kwargs).images
    assert torch.equal(one, listed)
    with pytest.raises(ValueError, match="negative_prompt must be a string or a list of 2 strings"):
        pipe(["a", "b"], negative_prompt=["x", "y", "z"])
