"""The training objective (`TransfusionDiffusionObjective`) and the model's LM loss.

The model predicts for the latents and timesteps it is given; the objective draws timesteps, noise and caption
dropout, noises through the sampling scheduler's convention and adds λ·MSE to the LM loss. These tests pin the
contract between the two: a forward on a clean image is a deterministic caption likelihood, the training target is
what the matching diffusers sampler inverts, and LM losses of the parts of a batch add up through
`num_items_in_batch`.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config, tiny_model
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from modeling_transfusion import TransfusionDiffusionObjective, TransfusionForCausalLM, image_block_ids
from modeling_transfusion.diffusion_transfusion import image_follows_text


def encoded(processor, model, rows):
    """Processor batch for `rows` with the images as latents (`image_latents`) instead of pixels."""
    batch = dict(processor(rows, add_eos=True, return_labels=True))
    if "pixel_values" in batch:
        with torch.no_grad():
            batch["image_latents"] = model.encode_images(batch.pop("pixel_values"))
    return batch


def random_images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 32, 32, generator=g) * 2 - 1 for _ in range(n)]


# -- the model's forward: a clean image is a deterministic condition ----------------------------------------------
def test_caption_loss_on_a_clean_image_is_deterministic_and_the_cross_entropy_of_the_caption(processor):
    model = tiny_model()  # eval()
    (image,) = random_images(1)
    batch = encoded(processor, model, [[image, "two green triangles"]])
    with torch.no_grad():
        first = model(**batch)
        second = model(**batch)
    # the same call twice gives the same loss (it used to noise the image at a random t: 5.685 vs 5.666)
    torch.testing.assert_close(first.loss, second.loss)
    # and that loss is the caption's cross-entropy, nothing else (no diffusion term)
    labels = batch["labels"][0]
    caption = processor.tokenizer("two green triangles", add_special_tokens=False)["input_ids"]
    targets = labels[1:] != -100
    ids = processor.special_ids
    assert labels[1:][targets].tolist() == [ids["boi"], *caption, ids["eos"]]  # not the image slots, nor <|eoi|>
    by_hand = F.cross_entropy(first.logits[0, :-1][targets], labels[1:][targets])
    torch.testing.assert_close(first.loss, by_hand)
    # default timesteps are 0: the image is read as clean
    zeros = model(**batch, image_timesteps=torch.zeros(1))
    torch.testing.assert_close(zeros.loss, first.loss)


def test_lm_losses_of_parts_with_num_items_in_batch_add_up_to_the_whole_batch(processor):
    """Text rows and image rows as two parts (the collator's split) vs one padded batch: with num_items_in_batch =
    the batch's count of targets, the parts' LM losses sum to the whole batch's mean."""
    model = tiny_model()
    images = random_images(2)
    text_rows = [["The quick brown fox jumps over the lazy dog."], ["Return a new list"]]
    image_rows = [["a photo of a dress", images[0]], [images[1], "two green triangles"]]
    whole = encoded(processor, model, text_rows + image_rows)
    parts = [encoded(processor, model, text_rows), encoded(processor, model, image_rows)]
    total = sum(int((p["labels"][:, 1:] != -100).sum()) for p in parts)
    assert total == int((whole["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        mean = model(**whole).loss
        shares = [model(**p, num_items_in_batch=total).loss for p in parts]
        means = [model(**p).loss for p in parts]
    # different padding (another tensor layout, another float32 kernel path): a tolerance, not bit equality
    torch.testing.assert_close(sum(shares), mean, rtol=1e-5, atol=1e-6)
    assert abs(float(sum(means) - mean)) > 1e-2  # without it the parts' means do not add up


# -- the objective's target and diffusers' samplers agree ---------------------------------------------------------
def noised(config, t):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 1, 4, 8, 8, generator=g)
    noisy, target = TransfusionDiffusionObjective(config).add_noise(x0, noise, t)
    return x0, noise, noisy, target


def ddim_to_the_end(config, prediction_type, model_output, t, sample):
    """One deterministic DDIM step from timestep t straight to the clean end (ᾱ = 1), with the training scheduler's
    configuration and the given prediction type."""
    scheduler = DDIMScheduler.from_config(config.scheduler_config(), prediction_type=prediction_type,
                                          set_alpha_to_one=True)
    scheduler.set_timesteps(1)  # the step from t lands below 0: the final ᾱ = 1
    return scheduler.step(model_output, t, sample, eta=0.0).prev_sample


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("t", [250, 600, 900])
def test_ddpm_training_target_is_what_the_sampler_inverts(prediction_type, t):
    config = tiny_config(prediction_type=prediction_type)
    x0, _, noisy, target = noised(config, torch.tensor([t]))
    torch.testing.assert_close(ddim_to_the_end(config, prediction_type, target, t, noisy), x0, rtol=0, atol=1e-5)
    # the same target read in another convention does not give the image back
    for other in {"epsilon", "v_prediction", "sample"} - {prediction_type}:
        wrong = ddim_to_the_end(config, other, target, t, noisy)
        assert (wrong - x0).abs().max() > 0.1, other


@pytest.mark.parametrize("sigma", [0.05, 0.5, 0.97])
def test_flow_matching_training_target_is_what_the_euler_sampler_inverts(sigma):
    config = tiny_config(diffusion_type="flow_matching", prediction_type="flow")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config.scheduler_config())
    scheduler.set_timesteps(sigmas=[sigma])  # one Euler step from σ to 0
    t = scheduler.timesteps[:1]
    assert scheduler.sigmas.tolist() == pytest.approx([sigma, 0.0])
    x0, noise, noisy, target = noised(config, t)
    torch.testing.assert_close(scheduler.step(target, t[0], noisy).prev_sample, x0, rtol=0, atol=1e-5)
    for wrong_output in (noise, -target):  # an ε-prediction; the velocity with the other sign (x0 − ε)
        scheduler.set_timesteps(sigmas=[sigma])
        assert (scheduler.step(wrong_output, t[0], noisy).prev_sample - x0).abs().max() > 0.1 * sigma


# -- the draws ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("limit", [500, 100])
def test_image_first_examples_never_exceed_noise_limit(processor, limit):
    model = TransfusionForCausalLM(tiny_config(noise_limit_timestep=limit)).train()
    objective = TransfusionDiffusionObjective(model.config)
    img = torch.zeros(3, 32, 32)
    batch = encoded(processor, model, [[img, "two green triangles"], ["a photo of a dress", img]])
    blocks = image_block_ids(batch["input_ids"], model.config.image_token_id)
    image_first = image_follows_text(model.config, batch["input_ids"], batch["attention_mask"], blocks)
    assert image_first.tolist() == [True, False]
    g = torch.Generator().manual_seed(0)
    t = objective.sample_timesteps(image_first.repeat(500), generator=g).view(500, 2)
    assert t[:, 0].max() < limit and t[:, 0].max() >= limit * 0.9 and t[:, 0].min() < 0.1 * limit  # all of [0, limit)
    assert t[:, 1].max() >= 900  # caption→image images use the whole schedule
    for _ in range(5):  # and the objective's own call routes the rows the same way
        assert objective(model, **batch, generator=g).image_timesteps[0] < limit


def test_caption_dropout_hides_caption_and_row_loss(processor):
    model = TransfusionForCausalLM(tiny_config(caption_drop_prob=0.5)).train()
    objective = TransfusionDiffusionObjective(model.config)
    c = model.config
    ids = torch.tensor([[c.bos_token_id, 10, 11, 12, c.boi_token_id, *[c.image_token_id] * c.image_slots,
                         c.eoi_token_id, 1]])
    labels, mask = ids.clone(), torch.ones_like(ids)
    blocks = image_block_ids(ids, c.image_token_id)
    g = torch.Generator().manual_seed(0)
    dropped = 0
    for _ in range(50):
        new_mask, new_labels = objective.drop_captions(ids, mask, labels, blocks, generator=g)
        if new_mask.sum() < mask.sum():
            dropped += 1
            assert new_mask[0, 1:4].sum() == 0 and new_mask[0, 0] == 1 and new_mask[0, 4:].all()
            assert (new_labels == -100).all()
        else:
            assert torch.equal(new_labels, labels)
    assert 10 < dropped < 40
    # an image-first row has no caption before its image: never dropped
    first = torch.tensor([[c.bos_token_id, c.boi_token_id, *[c.image_token_id] * c.image_slots, c.eoi_token_id, 10, 1]])
    for _ in range(20):
        mask = objective.drop_captions(first, torch.ones_like(first), first, image_block_ids(first, c.image_token_id),
                                       g)[0]
        assert mask.all()
    # dropout follows model.training unless told: almost surely at 0.999, and a dropped row has no LM loss left
    model = TransfusionForCausalLM(tiny_config(caption_drop_prob=0.999))
    objective = TransfusionDiffusionObjective(model.config)
    batch = encoded(processor, model, [["a photo of a dress", torch.zeros(3, 32, 32)]])
    with torch.no_grad():
        assert objective(model.train(), **batch, generator=g).lm_loss == 0
        assert objective(model.eval(), **batch, generator=g).lm_loss > 1
        assert objective(model.eval(), **batch, drop_captions=True, generator=g).lm_loss == 0


def test_a_generator_makes_the_draws_reproducible_and_leaves_the_global_rng_alone(processor):
    model = tiny_model()
    model.train()
    objective = TransfusionDiffusionObjective(model.config)
    batch = encoded(processor, model,
                    [[random_images(1)[0], "two green triangles"], ["a photo of a dress", torch.zeros(3, 32, 32)]])

    def run(seed):
        with torch.no_grad():
            return objective(model, **batch, generator=torch.Generator().manual_seed(seed))

    state = torch.get_rng_state()
    a, b, other = run(1), run(1), run(2)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.image_timesteps, b.image_timesteps)
    assert not torch.equal(a.image_timesteps, other.image_timesteps)
    torch.testing.assert_close(a.loss, b.loss)
    assert abs(float(a.diffusion_loss - other.diffusion_loss)) > 1e-4
    # without a generator the global RNG is used, so seeding it reproduces the draws (the training script's way)
    torch.manual_seed(5)
    c = objective(model, **batch)
    torch.manual_seed(5)
    d = objective(model, **batch)
    assert torch.equal(c.image_timesteps, d.image_timesteps)


def test_fixed_timesteps_and_the_loss_is_lm_plus_weighted_mse(processor):
    model = tiny_model(caption_drop_prob=0.0)
    objective = TransfusionDiffusionObjective(model.config)
    batch = encoded(processor, model, [["a photo of a dress", random_images(1)[0]]])
    t = torch.tensor([400])
    with torch.no_grad():
        out = objective(model, **batch, image_timesteps=t, generator=torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(batch["image_latents"].shape, generator=g)
        noisy, target = objective.add_noise(batch["image_latents"], noise, t)
        direct = model(**{**batch, "image_latents": noisy}, image_timesteps=t)
    assert torch.equal(out.image_timesteps, t)
    torch.testing.assert_close(out.lm_loss, direct.loss)
    torch.testing.assert_close(out.diffusion_loss, F.mse_loss(direct.image_predictions, target))
    torch.testing.assert_close(out.loss, out.lm_loss + model.config.diffusion_loss_weight * out.diffusion_loss)


# -- training through the objective -------------------------------------------------------------------------------
def test_overfitting_one_mixed_batch_lowers_text_and_image_loss(processor):
    torch.manual_seed(0)
    model = TransfusionForCausalLM(tiny_config(caption_drop_prob=0.0)).train()
    objective = TransfusionDiffusionObjective(model.config)
    images = random_images(2)
    batch = encoded(processor, model,
                    [["a photo of a dress", images[0]], [images[1], "two green triangles"], ["The quick brown fox."]])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)

    def losses(seed):  # the same timesteps and noise before and after
        with torch.no_grad():
            out = objective(model, **batch, generator=torch.Generator().manual_seed(seed))
        return out.lm_loss.item(), out.diffusion_loss.item()

    before = [losses(s) for s in range(4)]
    for _ in range(40):
        out = objective(model, **batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    after = [losses(s) for s in range(4)]
    assert sum(a[0] for a in after) < 0.5 * sum(b[0] for b in before)
    assert sum(a[1] for a in after) < 0.9 * sum(b[1] for b in before)
    assert not any(p.grad is not None for p in model.model.vae.parameters())


def test_gradient_checkpointing_matches(processor):
    torch.manual_seed(0)
    model = TransfusionForCausalLM(tiny_config(caption_drop_prob=0.5)).train()
    objective = TransfusionDiffusionObjective(model.config)
    batch = encoded(processor, model,
                    [["a photo of a dress", torch.zeros(3, 32, 32)], [random_images(1)[0], "a red circle"]])

    def grads():
        model.zero_grad()
        out = objective(model, **batch, generator=torch.Generator().manual_seed(1))
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain = grads()
    model.gradient_checkpointing_enable()
    checkpointed_loss, checkpointed = grads()
    torch.testing.assert_close(checkpointed_loss, plain_loss)
    assert plain.keys() == checkpointed.keys() and any("patch_encoder" in n for n in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_flow_matching_objective_runs(processor):
    torch.manual_seed(0)
    model = TransfusionForCausalLM(tiny_config(diffusion_type="flow_matching", prediction_type="flow")).train()
    objective = TransfusionDiffusionObjective(model.config)
    assert objective.scheduler is None
    batch = encoded(processor, model, [["a photo of a dress", torch.zeros(3, 32, 32)]])
    out = objective(model, **batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(out.diffusion_loss)
    assert out.image_timesteps.dtype.is_floating_point and 0 <= out.image_timesteps.item() < 1000


def test_loaded_model_trains_on_images(tmp_path, processor):
    """from_pretrained builds on the meta device; the objective, built from the loaded config, still trains it, and
    it takes pixels as well as latents."""
    TransfusionForCausalLM(tiny_config()).save_pretrained(tmp_path)
    loaded = TransfusionForCausalLM.from_pretrained(tmp_path).train()
    objective = TransfusionDiffusionObjective(loaded.config)
    batch = processor([["a photo of a dress", torch.zeros(3, 32, 32)]], add_eos=True, return_labels=True)
    out = objective(loaded, **batch)
    out.loss.backward()
    assert torch.isfinite(out.diffusion_loss) and loaded.lm_head.weight.grad is not None
