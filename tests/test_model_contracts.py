"""transformers' model contracts, held by our own tests (transformers' ModelTesterMixin runs in
tests/test_transformers_mixins.py when its test modules are present): return_dict, output_* from the config,
inputs_embeds, shift_labels / num_items_in_batch through `loss_function`, dynamic RoPE, generation config."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from modeling_transfusion import TransfusionConfig, TransfusionForCausalLM

IMG = 5  # image_token_id of the tiny config


def image_row(config, text=(10, 11), tail=(12, 13)):
    return torch.tensor([[config.bos_token_id, *text, config.boi_token_id] + [IMG] * config.image_slots
                         + [config.eoi_token_id, *tail]])


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_return_dict_false_gives_the_tuple_of_the_output(model):
    ids = image_row(model.config)
    latents = torch.randn(1, 4, 8, 8)
    out = model(input_ids=ids, image_latents=latents, labels=ids)
    tup = model(input_ids=ids, image_latents=latents, labels=ids, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == len(out.to_tuple())
    for a, b in zip(tup, out.to_tuple()):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b)
    base = model.model(input_ids=ids, image_latents=latents, return_dict=False)
    assert isinstance(base, tuple)
    torch.testing.assert_close(base[0], model.model(input_ids=ids, image_latents=latents).last_hidden_state)


def test_output_flags_per_call_and_from_the_config():
    model = tiny_model()
    ids = image_row(model.config)
    latents = torch.randn(1, 4, 8, 8)
    plain = model(input_ids=ids, image_latents=latents)
    assert plain.hidden_states is None and plain.attentions is None
    n, length = model.config.num_hidden_layers, ids.shape[1]
    # per call, also under sdpa: asking for the weights runs the eager reference for that call
    out = model(input_ids=ids, image_latents=latents, output_attentions=True, output_hidden_states=True)
    assert len(out.hidden_states) == n + 1 and len(out.attentions) == n
    assert out.attentions[0].shape == (1, model.config.num_attention_heads, length, length)
    # the weights are the Transfusion mask's: rows sum to 1, bidirectional within the image, causal for text
    weights = out.attentions[0][0, 0]
    torch.testing.assert_close(weights.sum(-1), torch.ones(length))
    slots = (ids[0] == IMG).nonzero().flatten()
    first, last = int(slots[0]), int(slots[-1])
    assert weights[first, last] > 0 and weights[first - 1, first] == 0
    torch.testing.assert_close(out.logits, plain.logits, atol=1e-5, rtol=1e-5)  # asking for weights changes no output
    # from the config (transformers allows output_attentions there only with eager attention)
    model.set_attn_implementation("eager")
    model.config.output_hidden_states = True
    model.config.output_attentions = True
    out = model(input_ids=ids, image_latents=latents)
    assert len(out.hidden_states) == n + 1 and len(out.attentions) == n


def test_inputs_embeds_equal_input_ids_for_text_and_images(model):
    ids = image_row(model.config)
    latents = torch.randn(1, 4, 8, 8)
    t = torch.tensor([250.0])
    by_ids = model(input_ids=ids, image_latents=latents, image_timesteps=t, labels=ids)
    embeds = model.get_input_embeddings()(ids)  # image slots hold the <|image|> embedding: that marks them
    by_embeds = model(inputs_embeds=embeds, image_latents=latents, image_timesteps=t, labels=ids)
    torch.testing.assert_close(by_embeds.logits, by_ids.logits)
    torch.testing.assert_close(by_embeds.image_predictions, by_ids.image_predictions)
    torch.testing.assert_close(by_embeds.loss, by_ids.loss)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(input_ids=ids, inputs_embeds=embeds, image_latents=latents)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()


def test_generate_from_inputs_embeds_with_an_image(model):
    ids = image_row(model.config)
    latents = torch.randn(1, 4, 8, 8)
    by_ids = model.generate(input_ids=ids, image_latents=latents, max_new_tokens=4, do_sample=False)[:, ids.shape[1] :]
    embeds = model.get_input_embeddings()(ids)
    by_embeds = model.generate(inputs_embeds=embeds, image_latents=latents, max_new_tokens=4, do_sample=False)
    assert torch.equal(by_embeds[:, -by_ids.shape[1] :], by_ids)


def test_lm_loss_is_transformers_loss_function_with_shift_labels_and_num_items(model):
    ids = image_row(model.config)
    latents = torch.randn(1, 4, 8, 8)
    out = model(input_ids=ids, image_latents=latents, labels=ids)
    # by hand: next-token cross-entropy over text targets only (no image slot, no <|eoi|>)
    targets = ids[0, 1:].clone()
    targets[(targets == IMG) | (targets == model.config.eoi_token_id)] = -100
    expected = F.cross_entropy(out.logits[0, :-1], targets, ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    shifted = F.pad(ids[:, 1:], (0, 1), value=-100)
    by_shift = model(input_ids=ids, image_latents=latents, shift_labels=shifted).loss
    torch.testing.assert_close(by_shift, expected)
    n = int((targets != -100).sum())
    summed = model(input_ids=ids, image_latents=latents, labels=ids, num_items_in_batch=2 * n).loss
    torch.testing.assert_close(summed, expected / 2)  # sum / num_items_in_batch
    with pytest.raises(ValueError, match=r"labels must be an integer tensor of the shape of input_ids \(1, 23\), "
                       r"got torch.int64 \(1, 5\)"):
        model(input_ids=ids, image_latents=latents, labels=ids[:, :5])


def test_forward_with_clean_images_and_labels_is_deterministic():
    """Labels add a loss; they change nothing else (the forward once noised images whenever labels came)."""
    model = tiny_model().train()  # even in training mode: noise is the objective's business
    ids = image_row(model.config)
    latents = torch.randn(1, 4, 8, 8)
    a = model(input_ids=ids, image_latents=latents, labels=ids)
    b = model(input_ids=ids, image_latents=latents, labels=ids)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
    torch.testing.assert_close(a.image_predictions, model(input_ids=ids, image_latents=latents).image_predictions)


def test_dynamic_ntk_rope_rescales_beyond_the_trained_length():
    def build(**overrides):
        torch.manual_seed(0)
        return TransfusionForCausalLM(TransfusionConfig.from_preset("tiny", **overrides)).eval()

    dynamic = build(max_position_embeddings=16,
                    rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    plain = build(max_position_embeddings=64)  # the same weights and, within 16 positions, the same frequencies
    short, long = torch.randint(6, 300, (1, 12)), torch.randint(6, 300, (1, 40))
    torch.testing.assert_close(dynamic(input_ids=short).logits, plain(input_ids=short).logits)  # within: unchanged
    assert not torch.allclose(dynamic(input_ids=long).logits, plain(input_ids=long).logits)  # beyond: rescaled
    rotary = dynamic.model.rotary_emb
    assert rotary.max_seq_len_cached == 40 and not torch.equal(rotary.inv_freq, rotary.original_inv_freq)
    dynamic(input_ids=short)  # back within the trained length: the original frequencies return
    torch.testing.assert_close(rotary.inv_freq, rotary.original_inv_freq)


def test_text_generation_config_stops_at_eos_and_boi():
    model = tiny_model()
    c = model.config
    assert model.generation_config.eos_token_id == [c.eos_token_id, c.boi_token_id]


def test_memory_tool_attributes(model):
    layer = type(model.model.layers[0]).__name__
    assert layer in model._no_split_modules and model._repeated_blocks == [layer]
