"""Mixture-of-Transformers (config.modality_experts="mot"): image slots use image copies of the attention projections,
MLP and norms; text keeps the canonical (Llama) weights. The same equivalences as the dense model, plus routing."""

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import outside_repo_env, randomize_zero_init, tiny_config, tiny_model
from diffusers import DDIMScheduler
from transformers import AutoModelForCausalLM, DynamicCache

from modeling_transfusion import TransfusionForCausalLM, TransfusionPipeline

IMG = 5
IMAGE_EXPERT_PREFIXES = ("image_self_attn.", "image_mlp.", "image_input_layernorm.", "image_post_attention_layernorm.")


def mixed_ids(config, images=1, tail=(13, 14)):
    row = [config.bos_token_id, 10, 11]
    for _ in range(images):
        row += [config.boi_token_id] + [IMG] * config.image_slots + [config.eoi_token_id, 12]
    return torch.tensor([row + list(tail)])


def mot_model(seed=0, **overrides):
    """A MoT model whose image experts differ from its text weights (random, not the copy init)."""
    model = tiny_model(seed, modality_experts="mot", **overrides)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".image_" in name or name.startswith("model.image_norm"):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def copy_text_into_image_experts(model):
    """LMFusion's initialisation: every image expert starts as a copy of its text module."""
    state = model.state_dict()
    with torch.no_grad():
        for name, p in model.named_parameters():
            text = name.replace("image_self_attn.", "self_attn.").replace(".image_", ".").replace("image_norm", "norm")
            if text != name:
                p.copy_(state[text])
    return model


def test_image_experts_exist_with_canonical_text_names():
    model = tiny_model(modality_experts="mot")
    names = {n for n, _ in model.named_parameters()}
    dense = {n for n, _ in tiny_model().named_parameters()}
    assert dense <= names  # the text path keeps every canonical name, so a Llama maps onto it by name
    extra = names - dense
    per_layer = {n.split(".", 3)[3] for n in extra if n.startswith("model.layers.")}
    assert {p.split(".")[0] + "." for p in per_layer} == set(IMAGE_EXPERT_PREFIXES)
    assert "model.image_norm.weight" in extra
    with pytest.raises(ValueError, match=r"modality_experts='moe' is invalid: allowed: \('shared', 'mot'\)"):
        tiny_config(modality_experts="moe")


def test_mot_with_copied_experts_equals_the_dense_model():
    dense = tiny_model(3)
    mot = tiny_model(3, modality_experts="mot")
    mot.load_state_dict(dense.state_dict(), strict=False)
    copy_text_into_image_experts(mot)
    ids, latents, t = mixed_ids(dense.config, images=2), torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0])
    a = dense(input_ids=ids, image_latents=latents, image_timesteps=t)
    b = mot(input_ids=ids, image_latents=latents, image_timesteps=t)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.image_predictions, a.image_predictions, atol=1e-5, rtol=1e-5)


def test_routing_image_experts_act_on_image_slots_only():
    model = mot_model()
    ids, latents = mixed_ids(model.config), torch.randn(1, 4, 8, 8)
    text_only = torch.tensor([[0, 10, 11, 12, 13]])
    base, base_text = model(input_ids=ids, image_latents=latents), model(input_ids=text_only).logits
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".image_" in name:
                p.mul_(1.5)
    after, after_text = model(input_ids=ids, image_latents=latents), model(input_ids=text_only).logits
    first_slot = 4
    torch.testing.assert_close(after_text, base_text, rtol=0, atol=0)  # text-only: the image experts are not run
    # the positions before the image are unchanged
    torch.testing.assert_close(after.logits[0, :first_slot], base.logits[0, :first_slot], rtol=0, atol=0)
    assert not torch.allclose(after.image_predictions, base.image_predictions)
    assert not torch.allclose(after.logits[0, -1], base.logits[0, -1])  # text after the image attends to it


def test_each_position_runs_through_one_expert_only():
    model = mot_model()
    rows = {"text": 0, "image": 0}
    layer = model.model.layers[0]
    layer.mlp.register_forward_hook(
        lambda m, args, out: rows.__setitem__("text", rows["text"] + args[0].shape[:-1].numel())
    )
    layer.image_mlp.register_forward_hook(
        lambda m, args, out: rows.__setitem__("image", rows["image"] + args[0].shape[:-1].numel())
    )
    ids = mixed_ids(model.config)
    model(input_ids=ids, image_latents=torch.randn(1, 4, 8, 8))
    n_slots = model.config.image_slots
    assert rows == {"text": ids.shape[1] - n_slots, "image": n_slots}
    rows.update(text=0, image=0)
    model(input_ids=torch.tensor([[0, 10, 11]]))
    assert rows == {"text": 3, "image": 0}  # text-only: no work for the image experts


def test_mot_eager_equals_sdpa():
    model = mot_model(patch_encoder="unet")
    ids, latents, t = mixed_ids(model.config, images=2), torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0])
    sdpa = model(input_ids=ids, image_latents=latents, image_timesteps=t)
    model.set_attn_implementation("eager")
    eager = model(input_ids=ids, image_latents=latents, image_timesteps=t)
    torch.testing.assert_close(sdpa.logits, eager.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sdpa.image_predictions, eager.image_predictions, atol=1e-5, rtol=1e-5)


def test_mot_cached_image_block_equals_full_forward():
    model = mot_model()
    ids, latents, t = mixed_ids(model.config, tail=()), torch.randn(1, 4, 8, 8), torch.tensor([300.0])
    full = model(input_ids=ids, image_latents=latents, image_timesteps=t)
    prefix = 4
    cache = DynamicCache(config=model.config)
    model(input_ids=ids[:, :prefix], past_key_values=cache, use_cache=True)
    step = model(input_ids=ids[:, prefix:], image_latents=latents, image_timesteps=t, past_key_values=cache,
                 use_cache=True)
    torch.testing.assert_close(step.image_predictions, full.image_predictions, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step.logits, full.logits[:, prefix:], atol=1e-5, rtol=1e-5)


def test_mot_cached_decoding_equals_full_recompute():
    model = mot_model()
    ids, latents = mixed_ids(model.config, tail=(20, 21)), torch.randn(1, 4, 8, 8)
    out = model.generate(input_ids=ids, image_latents=latents, max_new_tokens=5, do_sample=False, eos_token_id=None)
    seq = ids
    for _ in range(5):
        logits = model(input_ids=seq, image_latents=latents, use_cache=False).logits
        seq = torch.cat([seq, logits[:, -1:].argmax(-1)], dim=-1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_mot_pipeline_prefix_cache_equals_uncached_sampling(tokenizer, guidance):
    from test_pipeline import uncached_sampling

    model = mot_model()
    scheduler = DDIMScheduler.from_config(model.config.scheduler_config())
    pipe = TransfusionPipeline(transformer=model, scheduler=scheduler, tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cached = pipe("a red circle", num_inference_steps=3, guidance_scale=guidance, latents=noise.clone(),
                  output_type="latent")
    uncached = uncached_sampling(pipe, "a red circle", noise, 3, guidance)
    torch.testing.assert_close(cached.images, uncached, atol=1e-5, rtol=1e-5)


def test_mot_save_load_native_and_remote_code(tmp_path):
    model = mot_model()
    ids, latents, t = mixed_ids(model.config), torch.randn(1, 4, 8, 8), torch.tensor([123.0])
    ref = model(input_ids=ids, image_latents=latents, image_timesteps=t)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    torch.testing.assert_close(loaded(input_ids=ids, image_latents=latents, image_timesteps=t).image_predictions,
                               ref.image_predictions, atol=1e-5, rtol=1e-5)
    torch.save({"ids": ids, "latents": latents, "t": t, "images": ref.image_predictions}, tmp_path / "ref.pt")
    script = textwrap.dedent(
        f"""
        import importlib.util, torch
        assert importlib.util.find_spec("modeling_transfusion") is None
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True).eval()
        r = torch.load({str(tmp_path / "ref.pt")!r})
        assert m.config.modality_experts == "mot" and hasattr(m.model.layers[0], "image_mlp")
        o = m(input_ids=r["ids"], image_latents=r["latents"], image_timesteps=r["t"])
        torch.testing.assert_close(o.image_predictions, r["images"], atol=1e-5, rtol=1e-5)
        print("REMOTE-OK")
        """
    )
    env = outside_repo_env(tmp_path, {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path),
                                      "OMP_NUM_THREADS": "1"})
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "REMOTE-OK" in res.stdout, res.stderr[-3000:]


@pytest.mark.parametrize(
    "targets, text, image",
    [(["self_attn.q_proj", "mlp.down_proj"], True, False),
     (["image_self_attn.q_proj", "image_mlp.down_proj"], False, True),
     (["q_proj", "down_proj"], True, True)],
)
def test_lora_targets_text_image_or_both_experts(targets, text, image):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(mot_model(), LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A" in n}
    assert any(".image_" in n for n in adapted) == image
    assert any(".image_" not in n for n in adapted) == text
    assert not any(".vae." in n for n in adapted)


def test_mot_gradient_checkpointing_matches(processor):
    from modeling_transfusion import TransfusionDiffusionObjective

    torch.manual_seed(0)
    model = randomize_zero_init(TransfusionForCausalLM(tiny_config(modality_experts="mot"))).train()
    objective = TransfusionDiffusionObjective(model.config)
    ids = mixed_ids(model.config)
    latents = torch.randn(1, 4, 8, 8)

    def grads():
        model.zero_grad()
        out = objective(model, input_ids=ids, labels=ids, image_latents=latents,
                        generator=torch.Generator().manual_seed(1))
        out.loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    assert any(".image_mlp." in n for n in plain) and any(".mlp." in n and ".image_" not in n for n in plain)
    model.gradient_checkpointing_enable()
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)
