"""Core model: mask, attention backends, cache, save/load, init, and input validation."""

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import outside_repo_env, tiny_config, tiny_model
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.masking_utils import create_causal_mask

from modeling_transfusion import (
    TransfusionConfig,
    TransfusionForCausalLM,
    image_block_ids,
    transfusion_attention_mask,
)

IMG = 5  # image_token_id in the tiny config


def mixed_ids(config, text_a=(10, 11), text_b=(12,), images=1, tail=(13, 1)):
    """<bos> text_a [<boi> image <eoi> text_b] × images tail."""
    row = [config.bos_token_id, *text_a]
    for _ in range(images):
        row += [config.boi_token_id] + [IMG] * config.image_slots + [config.eoi_token_id, *text_b]
    return torch.tensor([row + list(tail)])


def test_mask_text_image_text_image_matches_hand_written():
    # t t [i i] t [i i i] : two images, 2 and 3 slots
    ids = torch.tensor([[7, 7, IMG, IMG, 7, IMG, IMG, IMG]])
    blocks = image_block_ids(ids, IMG)
    assert blocks.tolist() == [[-1, -1, 0, 0, -1, 1, 1, 1]]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],  # first image slot sees the second slot of its image
            [1, 1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(transfusion_attention_mask(blocks)[0, 0], expected)
    # transformers' builder (what the model uses) gives the same mask
    config = tiny_config()
    config._attn_implementation = "sdpa"
    built = create_causal_mask(
        config=config,
        inputs_embeds=torch.zeros(1, 8, 4),
        attention_mask=torch.ones(1, 8, dtype=torch.long),
        past_key_values=None,
        block_sequence_ids=blocks,
    )
    assert torch.equal(built[0, 0].bool(), expected)


@pytest.mark.parametrize("patch_encoder", ["linear", "unet"])
def test_eager_equals_sdpa(patch_encoder):
    model = tiny_model(patch_encoder=patch_encoder)
    ids = mixed_ids(model.config, images=2)
    latents = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10.0, 700.0])
    model.set_attn_implementation("sdpa")
    sdpa = model(input_ids=ids, image_latents=latents, image_timesteps=t)
    model.set_attn_implementation("eager")
    eager = model(input_ids=ids, image_latents=latents, image_timesteps=t)
    torch.testing.assert_close(sdpa.logits, eager.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sdpa.image_predictions, eager.image_predictions, atol=1e-5, rtol=1e-5)
    assert sdpa.image_predictions.abs().max() > 0


def test_image_slots_attend_bidirectionally_text_causally():
    model = tiny_model()
    ids = mixed_ids(model.config)
    latents = torch.randn(1, 4, 8, 8)
    base = model(input_ids=ids, image_latents=latents, output_hidden_states=True)
    changed = latents.clone()
    changed[..., -2:, -2:] += 1.0  # only the last patch changes
    other = model(input_ids=ids, image_latents=changed, output_hidden_states=True)
    first_slot = 4
    # the first slot sees the last patch (bidirectional within the image) ...
    assert not torch.allclose(base.hidden_states[-1][0, first_slot], other.hidden_states[-1][0, first_slot])
    # ... but text before the image does not
    torch.testing.assert_close(base.logits[0, :first_slot], other.logits[0, :first_slot])


def test_cached_image_block_equals_full_forward():
    model = tiny_model()
    ids = mixed_ids(model.config, tail=())
    latents = torch.randn(1, 4, 8, 8)
    t = torch.tensor([300.0])
    full = model(input_ids=ids, image_latents=latents, image_timesteps=t)
    prefix_len = 4  # bos, 2 text, boi
    cache = DynamicCache(config=model.config)
    model(input_ids=ids[:, :prefix_len], past_key_values=cache, use_cache=True)
    step = model(
        input_ids=ids[:, prefix_len:], image_latents=latents, image_timesteps=t, past_key_values=cache, use_cache=True
    )
    torch.testing.assert_close(step.image_predictions, full.image_predictions, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step.logits, full.logits[:, prefix_len:], atol=1e-5, rtol=1e-5)
    TransfusionForCausalLM.crop_cache(cache, prefix_len)
    assert cache.get_seq_length() == prefix_len


def test_cached_decoding_equals_full_recompute_and_generate_is_deterministic():
    model = tiny_model()
    ids = mixed_ids(model.config, tail=(20, 21))
    latents = torch.randn(1, 4, 8, 8)
    out = model.generate(input_ids=ids, image_latents=latents, max_new_tokens=6, do_sample=False)
    again = model.generate(input_ids=ids, image_latents=latents, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, again)
    # recompute every step without a cache
    seq = ids
    for _ in range(6):
        logits = model(input_ids=seq, image_latents=latents, use_cache=False).logits
        seq = torch.cat([seq, logits[:, -1:].argmax(-1)], dim=-1)
    assert torch.equal(out, seq)


def test_left_padding_gives_same_logits():
    model = tiny_model()
    ids = mixed_ids(model.config)
    latents = torch.randn(1, 4, 8, 8)
    plain = model(input_ids=ids, image_latents=latents).logits
    pad = model.config.pad_token_id
    padded = torch.cat([torch.full((1, 3), pad), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], dim=1)
    out = model(input_ids=padded, attention_mask=mask, image_latents=latents).logits
    torch.testing.assert_close(out[:, 3:], plain, atol=1e-5, rtol=1e-5)


def _reference_outputs(model, ids, latents, t):
    out = model(input_ids=ids, image_latents=latents, image_timesteps=t)
    return out.logits, out.image_predictions


@pytest.mark.parametrize("patch_encoder", ["linear", "unet"])
def test_save_load_native_identical(tmp_path, patch_encoder):
    model = tiny_model(patch_encoder=patch_encoder)
    ids, latents, t = mixed_ids(model.config), torch.randn(1, 4, 8, 8), torch.tensor([123.0])
    ref = _reference_outputs(model, ids, latents, t)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is TransfusionForCausalLM
    # The weights come back bit for bit ...
    saved, restored = model.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys()
    for name in saved:
        assert torch.equal(saved[name], restored[name]), name
    # ... the outputs up to float32 kernel choice: loaded tensors are memory-mapped, and another alignment can pick
    # another CPU kernel (differences of ~1e-7 on some machines).
    for a, b in zip(ref, _reference_outputs(loaded, ids, latents, t)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # buffers re-created by _init_weights after loading (RoPE) equal the originals
    torch.testing.assert_close(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    # the VAE stays frozen after loading
    assert not any(p.requires_grad for p in loaded.model.vae.parameters())
    for a, b in zip(model.model.vae.state_dict().values(), loaded.model.vae.state_dict().values()):
        assert torch.equal(a, b)


def test_save_load_remote_code_in_fresh_process(tmp_path):
    model = tiny_model(patch_encoder="unet")
    ids, latents, t = mixed_ids(model.config), torch.randn(1, 4, 8, 8), torch.tensor([123.0])
    logits, images = _reference_outputs(model, ids, latents, t)
    model.save_pretrained(tmp_path / "ckpt")
    torch.save({"ids": ids, "latents": latents, "t": t, "logits": logits, "images": images}, tmp_path / "ref.pt")
    script = textwrap.dedent(
        f"""
        import importlib.util, torch
        torch.set_num_threads(1)
        assert importlib.util.find_spec("modeling_transfusion") is None, "repository must not be importable here"
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True).eval()
        r = torch.load({str(tmp_path / "ref.pt")!r})
        o = m(input_ids=r["ids"], image_latents=r["latents"], image_timesteps=r["t"])
        assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
        torch.testing.assert_close(o.logits, r["logits"], atol=1e-6, rtol=0)
        torch.testing.assert_close(o.image_predictions, r["images"], atol=1e-6, rtol=0)
        print("REMOTE-OK")
        """
    )
    env = outside_repo_env(tmp_path)
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "REMOTE-OK" in res.stdout, res.stderr[-3000:]


def test_bf16_forward_runs():
    model = tiny_model().to(torch.bfloat16)
    out = model(input_ids=mixed_ids(model.config), image_latents=torch.randn(1, 4, 8, 8))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.image_predictions.float()).all()


@pytest.mark.parametrize("patch_encoder", ["linear", "unet"])
def test_image_head_output_projection_is_zero_at_init(patch_encoder):
    model = TransfusionForCausalLM(tiny_config(patch_encoder=patch_encoder))
    zero = [m for m in model.modules() if getattr(m, "_zero_init", False)]
    assert len(zero) == 1
    assert zero[0].weight.abs().sum() == 0 and zero[0].bias.abs().sum() == 0
    out = model(input_ids=mixed_ids(model.config), image_latents=torch.randn(1, 4, 8, 8))
    assert out.image_predictions.abs().max() == 0
    # the VAE keeps torch's own init (not the LM's normal(0, 0.02))
    conv = model.model.vae.encoder.conv_in.weight
    assert conv.std() > 0.05


# -- bad input ---------------------------------------------------------------------------------------------------
def test_wrong_image_size_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(num_images, 3, 32, 32\)"):
        model(input_ids=mixed_ids(model.config), pixel_values=torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="image_latents must have shape"):
        model(input_ids=mixed_ids(model.config), image_latents=torch.zeros(1, 4, 16, 16))


def test_ids_outside_vocabulary_are_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"id\(s\) \[300\] outside the vocabulary \[0, 300\)"):
        model(input_ids=torch.tensor([[0, 300, 7]]))


def test_image_count_mismatch_is_a_clear_error():
    model = tiny_model()
    ids = mixed_ids(model.config, images=2)
    with pytest.raises(ValueError, match=r"Number of images \(1\) does not match .* 2 images"):
        model(input_ids=ids, image_latents=torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="no image_latents or pixel_values"):
        model(input_ids=ids)
    short = torch.tensor([[0, 3] + [IMG] * 5 + [4]])
    with pytest.raises(ValueError, match="exactly 16 consecutive"):
        model(input_ids=short, image_latents=torch.zeros(1, 4, 8, 8))


def test_unknown_preset_and_bad_config_are_clear_errors():
    with pytest.raises(ValueError, match="Unknown Transfusion preset 'giant'.*paper-7B"):
        TransfusionConfig.from_preset("giant")
    with pytest.raises(ValueError, match="patch_encoder='conv'"):
        TransfusionConfig.from_preset("tiny", patch_encoder="conv")
    with pytest.raises(ValueError, match="latent_size=6 is invalid: must be divisible by patch_size=4"):
        TransfusionConfig.from_preset("tiny", latent_size=6, patch_size=4)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_checkpoint_is_a_clear_error(tmp_path, damage):
    tiny_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 10)
    with pytest.raises(ValueError, match=r"truncated or corrupted \(model.safetensors: "):
        TransfusionForCausalLM.from_pretrained(tmp_path)


def test_presets_reach_paper_sizes():
    config = TransfusionConfig.from_preset("paper-7B")
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (32, 4096, 32)
    assert config.image_size == 256 and config.latent_size == 32 and config.latent_channels == 8
    with torch.device("meta"):
        model = TransfusionForCausalLM(TransfusionConfig.from_preset("paper-0.16B"))
    backbone = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)
    assert 0.10e9 < backbone < 0.16e9


def test_causal_image_attention_ablation_switch():
    model = tiny_model(image_attention="causal")
    ids = mixed_ids(model.config)
    latents = torch.randn(1, 4, 8, 8)
    base = model(input_ids=ids, image_latents=latents, output_hidden_states=True)
    changed = latents.clone()
    changed[..., -2:, -2:] += 1.0  # only the last patch changes: with causal attention the first slot cannot see it
    other = model(input_ids=ids, image_latents=changed, output_hidden_states=True)
    torch.testing.assert_close(base.hidden_states[-1][0, 4], other.hidden_states[-1][0, 4])
    with pytest.raises(ValueError, match="image_attention='sideways'"):
        tiny_config(image_attention="sideways")
