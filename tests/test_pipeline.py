"""TransfusionPipeline: equivalences with direct model calls, CFG, seeds, schedulers, captioning, interleaving,
one-folder save/load, and input errors."""

import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import outside_repo_env, tiny_model
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

ROOT = Path(__file__).resolve().parents[1]


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
    cached = pipe("two green triangles", num_inference_steps=4, guidance_scale=guidance, latents=noise,
                  output_type="latent")
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
    caption = pipe.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert caption.strip() == captions[0]


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
        out = pipe("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                   output_type="latent")
        torch.testing.assert_close(out.images, torch.load({str(tmp_path / "expected.pt")!r}), atol=1e-6, rtol=0)
        model = AutoModelForCausalLM.from_pretrained(root + "/transformer", trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(root + "/transformer", trust_remote_code=True)
        # subfolder= with remote code: the Hub form of the same load
        same = AutoModelForCausalLM.from_pretrained(root, subfolder="transformer", trust_remote_code=True)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))
        assert AutoProcessor.from_pretrained(root, subfolder="transformer", trust_remote_code=True).image_slots == 16
        inputs = processor(["a red circle", torch.zeros(3, 32, 32)])
        assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]
        print("REMOTE-PIPELINE-OK")
        """
    )
    env = outside_repo_env(tmp_path)
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "REMOTE-PIPELINE-OK" in res.stdout, res.stderr[-3000:]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt": []}, "prompt must be a non-empty string or list"),
        ({"prompt": "a", "height": 30}, "height=30 is off the patch grid: it must be a multiple of 8"),
        ({"prompt": "a", "width": 64}, "width=64: this model generates 32×32 images"),
        ({"prompt": "a", "num_inference_steps": 0}, r"num_inference_steps must be an integer in \[1, 1000\], got 0"),
        ({"prompt": "a", "guidance_scale": -1.0}, "guidance_scale must be a finite number ≥ 0"),
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
    listed = pipe(["a", "b"], negative_prompt=["blurry", "blurry"], generator=[gen(i) for i in range(4)],
                  **kwargs).images
    assert torch.equal(one, listed)
    with pytest.raises(ValueError, match="negative_prompt must be a string or a list of 2 strings"):
        pipe(["a", "b"], negative_prompt=["x", "y", "z"])


# -- diffusers' pipeline contracts (PipelineTesterMixin), encoded here -----------------------------------------------
def test_callback_cfg_cutoff_changes_the_result_and_sees_num_timesteps(pipe):
    """diffusers' CFG-cutoff callbacks set `pipe._guidance_scale = 0.0` after step k; the pipeline's properties tell
    the callback how many timesteps there are and whether guidance is on."""
    seen = []

    def cutoff(p, i, t, kwargs):
        seen.append((i, p.num_timesteps, p.do_classifier_free_guidance, p.guidance_scale))
        if i == 1:
            p._guidance_scale = 0.0
        return kwargs

    kwargs = dict(num_inference_steps=4, guidance_scale=5.0, output_type="latent")
    guided = pipe("a red circle", generator=gen(0), **kwargs).images
    cut = pipe("a red circle", generator=gen(0), callback_on_step_end=cutoff, **kwargs).images
    assert [s[:2] for s in seen] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert [s[2] for s in seen] == [True, True, False, False] and pipe.guidance_scale == 0.0
    assert not torch.allclose(guided, cut)
    # after the cutoff the steps are the conditional prediction alone: equal to a run whose scale drops to 1
    def to_one(p, i, t, kwargs):
        if i == 1:
            p._guidance_scale = 1.0
        return kwargs

    dropped_to_one = pipe("a red circle", generator=gen(0), callback_on_step_end=to_one, **kwargs).images
    torch.testing.assert_close(dropped_to_one, cut, atol=1e-5, rtol=1e-5)


def test_heun_counts_its_model_evaluations_in_num_timesteps(pipe):
    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    steps = []
    pipe("a", num_inference_steps=3, callback_on_step_end=lambda p, i, t, k: steps.append(p.num_timesteps) or k,
         output_type="latent")  # fmt: skip
    assert steps == [5] * 5  # 2 evaluations per step but the last: diffusers' timesteps, not num_inference_steps


def test_interrupt_skips_the_remaining_steps(pipe):
    calls = []

    def stop(p, i, t, kwargs):
        calls.append(i)
        p._interrupt = True
        return kwargs

    pipe("a", num_inference_steps=4, callback_on_step_end=stop, output_type="latent")
    assert calls == [0] and pipe.interrupt


def test_default_inference_steps_is_saved_with_the_pipeline(tmp_path, tokenizer):
    pipe = make_pipe(tokenizer)
    pipe.register_to_config(default_inference_steps=3)
    pipe.save_pretrained(tmp_path)
    loaded = TransfusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.default_inference_steps == 3
    counts = []
    loaded("a", callback_on_step_end=lambda p, i, t, k: counts.append(i) or k, output_type="latent")
    assert counts == [0, 1, 2]
    assert make_pipe(tokenizer).config.default_inference_steps is None  # unset: 50, diffusers' usual default


def test_variant_and_per_component_dtype_load_through_diffusers(tmp_path, pipe):
    pipe.save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "transformer" / "model.fp16.safetensors").exists()
    loaded = TransfusionPipeline.from_pretrained(tmp_path, variant="fp16")
    for (name, a), b in zip(pipe.transformer.state_dict().items(), loaded.transformer.state_dict().values()):
        assert torch.equal(a, b), name  # weights bit-exact
    dtypes = {"transformer": torch.bfloat16, "default": torch.float32}
    mixed = TransfusionPipeline.from_pretrained(tmp_path, variant="fp16", torch_dtype=dtypes)
    assert mixed.transformer.dtype == torch.bfloat16 and mixed.vae.dtype == torch.bfloat16
    mixed.set_progress_bar_config(disable=True)
    images = mixed("a red circle", num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_to_dtype_and_offload_declarations(pipe):
    assert pipe.model_cpu_offload_seq == "transformer" and hasattr(pipe, "enable_model_cpu_offload")
    assert set(pipe.model_cpu_offload_seq.split("->")) <= set(pipe.components)
    assert pipe._callback_tensor_inputs == ["latents"]
    pipe.to(torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae is pipe.transformer.vae
    with pytest.raises(ValueError, match=r"callback_on_step_end_tensor_inputs \['noise'\] not in \['latents'\]"):
        pipe("a", callback_on_step_end_tensor_inputs=["noise"])


def test_progress_bar_config(pipe, capsys):
    pipe.set_progress_bar_config(disable=False)
    pipe("a", num_inference_steps=2, output_type="latent")
    assert "2/2" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    pipe("a", num_inference_steps=2, output_type="latent")
    assert "2/2" not in capsys.readouterr().err


def test_dict_and_tuple_outputs_are_equal(pipe):
    a = pipe("a", num_inference_steps=2, generator=gen(0), output_type="np").images
    b = pipe("a", num_inference_steps=2, generator=gen(0), output_type="np", return_dict=False)[0]
    assert np.array_equal(a, b)


def test_caption_refuses_an_empty_image(pipe):
    with pytest.raises(ValueError, match=r"image is empty \(size 0×0\)"):
        pipe.caption(PIL.Image.new("RGB", (0, 0)))


def test_interleaved_batch_equals_each_prompt_alone(pipe):
    """Rows that stop at `<|boi|>` at different times (or never) give what each gives alone."""
    c = pipe.transformer.config
    trigger, after = pipe.processor.encode_text("a")[0], pipe.processor.encode_text("photo")[0]
    state = {}
    model = pipe.transformer
    model.register_forward_pre_hook(lambda m, args, kw: state.update(ids=kw.get("input_ids")), with_kwargs=True)

    def force(module, inputs, logits):  # the next token by rule from the last input: <|boi|> after `trigger`
        last = state["ids"][:, -1]
        logits[last == trigger, -1, c.boi_token_id] += 1e4
        logits[last == c.eoi_token_id, -1, after] += 1e4
        logits[last == after, -1, c.eos_token_id] += 1e4
        return logits

    model.lm_head.register_forward_hook(force)
    prompts = [["red", "a"], ["two green triangles"], ["dress a"]]
    kwargs = dict(max_new_tokens=6, num_inference_steps=2, guidance_scale=2.0, output_type="latent")
    batch = pipe.generate_interleaved(prompts, generator=gen(0), **kwargs)
    assert [type(x).__name__ for x in batch.items[0]] == ["Tensor", "str"]
    for row, prompt in enumerate(prompts):
        alone = pipe.generate_interleaved(prompt, generator=gen(0), **kwargs)
        assert torch.equal(batch.token_ids[row], alone.token_ids)
        assert [type(x) for x in batch.items[row]] == [type(x) for x in alone.items]
        for a, b in zip(batch.items[row], alone.items):
            if isinstance(a, str):
                assert a == b
            else:  # the batch's noise comes from the same generator in another order: compare the layout only
                assert a.shape == b.shape == (1, 4, 8, 8)


@pytest.mark.parametrize("folder", ["transfusion-tiny", "transfusion-tiny-instruct"])
def test_bundled_checkpoint_code_equals_the_sources(folder):
    """The code copies in the bundled checkpoints (root and transformer/) are this package's files; refresh them
    with `python -m conversion.export_pipeline --refresh-code checkpoints/FOLDER`."""
    from modeling_transfusion.pipeline_transfusion import _stale_code_files, shipped_code_files

    names = {p.name for p in shipped_code_files()}
    assert {"pipeline_transfusion.py", "modeling_transfusion.py", "processing_transfusion.py"} <= names
    assert _stale_code_files(ROOT / "checkpoints" / folder) == []


def test_a_folder_with_other_code_is_refused_by_name(tmp_path, pipe):
    pipe.save_pretrained(tmp_path)
    (tmp_path / "transformer" / "processing_transfusion.py").write_text("# edited\n")
    with pytest.raises(ValueError, match=r"\['transformer/processing_transfusion.py'\] .* differ .*--refresh-code"):
        TransfusionPipeline.from_pretrained(tmp_path)
