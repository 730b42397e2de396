"""Instruction following: the conversation layout, input images in the objective and the collator, the generated edit
and chat data, and editing and chat through the pipeline (cached vs uncached, InstructPix2Pix guidance, batches)."""

import numpy as np
import pytest
import torch
from conftest import tiny_model
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from evaluation.detector import detect
from modeling_transfusion.diffusion_transfusion import TransfusionDiffusionObjective
from modeling_transfusion.modeling_transfusion import image_block_ids
from pipelines import TransfusionPipeline
from training.collate import TransfusionCollator
from training.datasets import instruct
from training.datasets.shapes import relation_holds

# -- the conversation layout --------------------------------------------------------------------------------------


def latent(seed, c):
    return torch.randn(c.latent_channels, c.latent_size, c.latent_size, generator=torch.Generator().manual_seed(seed))


def test_conversation_layout_and_image_roles(processor, tokenizer):
    c = tiny_model().config
    a, b, d = latent(0, c), latent(1, c), latent(2, c)
    conversation = [{"role": "user", "content": "draw it"}, {"role": "assistant", "content": [a]},
                    {"role": "user", "content": [b, "now blue"]}, {"role": "assistant", "content": d}]  # fmt: skip
    enc = processor(conversation, add_eos=True, images_as_latents=True, return_image_inputs=True)
    ids, s = processor.special_ids, processor.encode_text
    image = [ids["boi"], *processor.image_slot_ids, ids["eoi"]]
    expected = [ids["bos"], *s("user:"), *s("draw it"), *s("assistant:"), *image, ids["eos"], *s("user:"), *image,
                *s("now blue"), *s("assistant:"), *image, ids["eos"]]  # fmt: skip
    assert enc["input_ids"][0].tolist() == expected
    # the user's image and the earlier answer are inputs; only the last generated image trains as generated
    assert enc["image_is_input"].tolist() == [True, True, False]
    torch.testing.assert_close(enc["image_latents"], torch.stack([a, b, d]))
    # a conversation ending with the user's turn is a generation prompt: it ends at "assistant:"
    prompt = processor(conversation[:3], images_as_latents=True)["input_ids"][0].tolist()
    assert prompt == expected[: len(expected) - len(image) - 1]
    # plain rows: every image generated, as before
    plain = processor(["a red circle", a], images_as_latents=True, return_image_inputs=True)
    assert plain["image_is_input"].tolist() == [False]


@pytest.mark.parametrize(
    "conversation, match",
    [
        ([{"role": "system", "content": "hi"}], "message 0"),
        ([{"role": "user", "content": []}], "message 0"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": {"text": "x"}}], "message 1"),
    ],
)
def test_bad_conversations_name_the_message(processor, conversation, match):
    with pytest.raises(ValueError, match=match):
        processor(conversation)


def test_generation_prompt_must_end_with_a_user_turn(processor):
    with pytest.raises(ValueError, match="ending with a user turn"):
        processor.conversation_prompt([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])


# -- input images in training -------------------------------------------------------------------------------------


def edit_batch(processor, c):
    edit = [{"role": "user", "content": [latent(0, c), "make it blue"]}, {"role": "assistant", "content": latent(1, c)}]
    rows = [edit, ["a red circle", latent(2, c)]]
    return processor(rows, add_eos=True, images_as_latents=True, return_labels=True, return_image_inputs=True)


def test_input_images_stay_clean_and_carry_no_diffusion_loss(processor):
    model = tiny_model()
    c, objective = model.config, TransfusionDiffusionObjective(model.config)
    batch = edit_batch(processor, c)
    fixed = torch.tensor([700, 300])
    out = objective(model, **{k: v for k, v in batch.items()}, image_timesteps=torch.tensor([500, 700, 300]),
                    drop_captions=False, generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out.image_timesteps.tolist() == [0, 700, 300]  # the edit's source at t = 0
    # the same draws by hand: noise for all three, the source put back clean, the loss over the two generated images
    g = torch.Generator().manual_seed(0)
    clean = batch["image_latents"]
    noise = torch.randn(clean.shape, generator=g)
    noisy, target = objective.add_noise(clean[1:], noise[1:], fixed)
    model_out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                      image_latents=torch.cat([clean[:1], noisy]),
                      image_timesteps=torch.tensor([0, 700, 300]))  # fmt: skip
    expected = torch.nn.functional.mse_loss(model_out.image_predictions[1:], target)
    torch.testing.assert_close(out.diffusion_loss, expected)
    torch.testing.assert_close(out.loss, model_out.loss + c.diffusion_loss_weight * expected)


def test_caption_dropout_of_an_edit_keeps_its_source(processor):
    model = tiny_model()
    c = model.config
    batch = edit_batch(processor, c)
    objective = TransfusionDiffusionObjective(c.__class__.from_dict({**c.to_dict(), "caption_drop_prob": 0.999}))
    blocks = image_block_ids(batch["input_ids"], c.image_token_id)
    mask, labels = objective.drop_captions(batch["input_ids"], batch["attention_mask"], batch["labels"], blocks,
                                           torch.Generator().manual_seed(0), batch["image_is_input"])  # fmt: skip
    ids = processor.special_ids
    kept = batch["input_ids"][0][mask[0].bool()].tolist()
    image = [ids["boi"], *processor.image_slot_ids, ids["eoi"]]
    assert kept == [ids["bos"], *image, *image, ids["eos"]]  # the instruction and the roles hidden, both images kept
    assert batch["input_ids"][1][mask[1].bool()].tolist() == [ids["bos"], *image, ids["eos"]]
    assert (labels == -100).all()


def test_collator_hands_on_which_images_are_inputs(processor):
    c = tiny_model().config
    edit = [{"role": "user", "content": [latent(1, c), "remove it"]}, {"role": "assistant", "content": latent(2, c)}]
    examples = [
        {"index": 0, "kind": "caption_image", "text": "a red circle", "latent": latent(0, c), "window": 0.0},
        {"index": 1, "kind": "text", "text": "some text", "latent": None, "window": 0.0},
        {"index": 2, "kind": "interleaved", "text": None, "latent": None, "window": 0.0, "items": edit},
    ]
    text, captions, conversations = TransfusionCollator(processor)(examples)["parts"]  # each padded to its own rows
    assert "image_latents" not in text and captions["image_is_input"].tolist() == [False]
    assert conversations["image_is_input"].tolist() == [True, False]
    torch.testing.assert_close(conversations["image_latents"], torch.stack([latent(1, c), latent(2, c)]))
    (one,) = TransfusionCollator(processor, split_text=False)(examples)["parts"]
    assert one["image_is_input"].tolist() == [False, True, False]


# -- the generated data -------------------------------------------------------------------------------------------


def found(objects, detections, tolerance=2.0):
    """Every object is detected with its colour and shape near its box centre."""
    def near(d, o):
        return max(abs(d.centroid[0] - o.box_centre[0]), abs(d.centroid[1] - o.box_centre[1])) <= tolerance

    return all(any((d.colour, d.shape) == (o.colour, o.shape) and near(d, o) for d in detections) for o in objects)


def test_edits_do_what_their_instruction_says():
    for i in range(60):
        edit = instruct.edit_example(i)
        detections = detect(instruct.render_objects(edit.target))
        assert found(edit.target, detections) and len(detections) == len(edit.target), edit
        assert found(edit.kept, detect(instruct.render_objects(edit.source))), "kept objects were in the source"
        if edit.kind == "recolour":
            (new,) = edit.changed
            assert new.colour in edit.instruction and any(o.shape == new.shape and o.colour != new.colour
                                                          for o in edit.source)  # fmt: skip
        elif edit.kind == "move":
            assert relation_holds(edit.changed[0].box_centre, edit.reference.box_centre, edit.relation)
            assert edit.relation in edit.instruction
        elif edit.kind == "remove":
            assert edit.removed[0] not in edit.target and f"{edit.removed[0].colour} {edit.removed[0].shape}" in (
                edit.instruction)  # fmt: skip
        elif edit.kind == "add":
            assert len(edit.target) == len(edit.source) + 1
        else:
            assert len({(o.colour, o.shape) for o in edit.target}) == 1


def test_heldout_edits_never_reach_training():
    heldout = {(e.kind, e.signature) for e in instruct.heldout_edits(40)}
    assert heldout <= instruct.HELDOUT_EDITS and len({k for k, _ in heldout}) == len(instruct.EDIT_KINDS)
    train = [instruct.edit_example(i) for i in range(400)]
    assert not {(e.kind, e.signature) for e in train} & instruct.HELDOUT_EDITS
    assert {e.kind for e in train} == set(instruct.EDIT_KINDS)
    assert len({e.instruction.split()[0] for e in train}) >= 8  # several phrasings


def test_chat_rows_draw_ask_and_edit_in_turn():
    kinds = [instruct.chat_example(i).kind for i in range(60)]
    assert set(kinds) == {"draw", "ask", "multi"}
    for i in range(60):
        example = instruct.chat_example(i)
        roles = [role for role, _ in example.turns]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        if example.kind == "ask":
            (_, (image, question)), (_, answer) = example.turns
            objects = image[1]
            assert (question, answer) in instruct.scene_questions(objects, answer if question.startswith(
                ("what is", "what do", "describe")) else "")  # fmt: skip


def test_answers_are_true_of_the_scene():
    objects = (instruct.PlacedObject("red", "circle", 2, 2, 10), instruct.PlacedObject("blue", "square", 18, 2, 10))
    answers = dict(instruct.scene_questions(objects, "a red circle to the left of a blue square"))
    assert answers["what colour is the circle?"] == "red" and answers["how many squares are there?"] == "one"
    assert answers["is there a blue square?"] == "yes" and answers["is there a red square?"] == "no"
    assert answers["how many triangles are there?"] == "none"


# -- editing and chat through the pipeline ------------------------------------------------------------------------


def make_pipe(tokenizer, scheduler_class=DDIMScheduler, **overrides):
    model = tiny_model(**overrides)
    pipe = TransfusionPipeline(model, scheduler_class.from_config(model.config.scheduler_config()), tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture()
def pipe(tokenizer):
    return make_pipe(tokenizer)


def source_image(seed=0):
    return instruct.render_objects(instruct.edit_example(seed).source)


def uncached_edit(pipe, instruction, image, noise, steps, guidance, image_guidance=None):
    """Reference: every row (conditional, without the instruction, with nothing) written out and the whole sequence
    recomputed at every step, no cache; guidance combined by hand."""
    c, proc = pipe.transformer.config, pipe.processor
    rows = [[{"role": "user", "content": [image, instruction]}]]
    rows += [[image]] if guidance > 1 or image_guidance else []
    rows += [[""]] if image_guidance else []
    enc = proc(rows, append_boi=True, padding_side="left")
    slots = torch.full((len(rows), c.image_slots), c.image_token_id)
    ids = torch.cat([enc["input_ids"], slots], dim=1)
    mask = torch.cat([enc["attention_mask"], torch.ones_like(slots)], dim=1)
    known = pipe.transformer.encode_images(enc["pixel_values"])
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    latents = noise.clone()
    per_row = enc["input_ids"].eq(proc.special_ids["boi"]).sum(1) - 1  # each row's known images
    for t in scheduler.timesteps:
        parts, k = [], 0
        for r in range(len(rows)):  # the row's known images (clean, t = 0), then the noisy one
            parts += [known[k : k + per_row[r]], latents]
            k += per_row[r]
        timesteps = torch.cat([torch.cat([torch.zeros(int(n)), t.reshape(1).float()]) for n in per_row])
        pred = pipe.transformer(input_ids=ids, attention_mask=mask, image_latents=torch.cat(parts),
                                image_timesteps=timesteps).image_predictions  # fmt: skip
        pred = pred[torch.cumsum(per_row + 1, 0) - 1]  # the generated image of each row
        if len(rows) == 2:
            pred = pred[1] + guidance * (pred[0] - pred[1])
        elif len(rows) == 3:
            pred = pred[2] + image_guidance * (pred[1] - pred[2]) + guidance * (pred[0] - pred[1])
        latents = scheduler.step(pred.reshape(noise.shape), t, latents).prev_sample
    return latents


@pytest.mark.parametrize("guidance, image_guidance", [(1.0, None), (3.0, None), (3.0, 1.5), (1.0, 2.0)])
def test_cached_edit_equals_uncached(pipe, guidance, image_guidance):
    c = pipe.transformer.config
    noise = torch.randn(1, c.latent_channels, c.latent_size, c.latent_size, generator=torch.Generator().manual_seed(3))
    image = source_image()
    cached = pipe("make the circle blue", image=image, num_inference_steps=3, guidance_scale=guidance,
                  image_guidance_scale=image_guidance, latents=noise, output_type="latent").images  # fmt: skip
    reference = uncached_edit(pipe, "make the circle blue", image, noise, 3, guidance, image_guidance)
    torch.testing.assert_close(cached, reference, atol=1e-5, rtol=1e-5)


def test_the_source_image_conditions_the_edit(pipe):
    kwargs = dict(num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    a = pipe("make it blue", image=source_image(0), **kwargs).images
    kwargs["generator"] = torch.Generator().manual_seed(0)
    b = pipe("make it blue", image=source_image(1), **kwargs).images
    kwargs["generator"] = torch.Generator().manual_seed(0)
    plain = pipe("make it blue", **kwargs).images
    assert not np.allclose(a, b) and not np.allclose(a, plain)


def test_edit_batches_equal_singles(pipe):
    images = [source_image(0), source_image(1)]
    gens = lambda: [torch.Generator().manual_seed(s) for s in (0, 1, 2, 3)]  # noqa: E731
    batch = pipe(["make it blue", "remove the square"], image=images, num_images_per_prompt=2, generator=gens(),
                 num_inference_steps=2, output_type="latent").images  # fmt: skip
    singles = [pipe(p, image=i, generator=g, num_inference_steps=2, output_type="latent").images
               for (p, i), g in zip([(p, i) for p, i in zip(["make it blue", "remove the square"], images)
                                     for _ in range(2)], gens())]  # fmt: skip
    torch.testing.assert_close(batch, torch.cat(singles), atol=1e-5, rtol=1e-5)
    one_for_all = pipe(["make it blue", "remove the square"], image=images[0], generator=gens()[:2],
                       num_inference_steps=2, output_type="latent").images  # fmt: skip
    each = pipe(["make it blue", "remove the square"], image=[images[0]] * 2, generator=gens()[:2],
                num_inference_steps=2, output_type="latent").images  # fmt: skip
    torch.testing.assert_close(one_for_all, each)


@pytest.mark.parametrize("scheduler_class", [DPMSolverMultistepScheduler, EulerDiscreteScheduler])
def test_edit_runs_with_other_schedulers(tokenizer, scheduler_class):
    pipe = make_pipe(tokenizer, scheduler_class)
    out = pipe("make it blue", image=source_image(), num_inference_steps=3, image_guidance_scale=1.5,
               generator=torch.Generator().manual_seed(0), output_type="np").images  # fmt: skip
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()


def test_edit_with_flow_matching(tokenizer):
    pipe = make_pipe(tokenizer, FlowMatchEulerDiscreteScheduler, diffusion_type="flow_matching", prediction_type="flow")
    out = pipe("make it blue", image=source_image(), num_inference_steps=3, output_type="np").images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"image": "source.png"}, "image must be a PIL image"),
        ({"image": [np.zeros((32, 32, 3), np.uint8)] * 3, "prompt": ["a", "b"]}, "3 images for 2 prompts"),
        ({"image_guidance_scale": 2.0}, "pass image="),
        ({"image": np.zeros((32, 32, 3), np.uint8), "image_guidance_scale": "high"}, "image_guidance_scale"),
        ({"image": np.zeros((32, 32, 3), np.float32)}, "uint8"),
    ],
)
def test_bad_edit_inputs(pipe, kwargs, match):
    kwargs = {"prompt": "make it blue", **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs, num_inference_steps=2)


def test_chat_answers_the_next_turn(pipe):
    conversation = [{"role": "user", "content": [source_image(), "what is in this picture?"]}]
    out = pipe.chat(conversation, max_new_tokens=6, num_inference_steps=2)
    assert out.message["role"] == "assistant" and out.message["content"]
    layout = pipe.processor(conversation)["input_ids"][0]
    assert out.token_ids[0, : len(layout)].tolist() == layout.tolist()  # the conversation as the processor lays it out
    # the same conversation in a batch answers the same (greedy)
    batch = pipe.chat([conversation, [{"role": "user", "content": "draw a red circle"}]], max_new_tokens=6,
                      num_inference_steps=2)  # fmt: skip
    assert batch.message[0]["content"][0] == out.message["content"][0]
    with pytest.raises(ValueError, match="ending with a user turn"):
        pipe.chat([*conversation, out.message])


def test_chat_image_guidance_keeps_the_conversation_images(pipe, monkeypatch):
    """The unconditional row of an image generated in a conversation is the conversation's images alone."""
    seen = []
    prefill = pipe.prefill

    def spy(input_ids, attention_mask, image_latents=None, prefix=None):
        seen.append((input_ids.clone(), None if image_latents is None else image_latents.shape[0]))
        return prefill(input_ids, attention_mask, image_latents, prefix)

    monkeypatch.setattr(pipe, "prefill", spy)
    known = [latent(0, pipe.transformer.config)]
    pipe._interleaved_image(pipe.prefill(*pipe.encode_prompt(["x"], None, False)), [known], 2, 3.0, 1.5, None, None)
    ids, n_images = seen[-1]
    boi = pipe.processor.special_ids["boi"]
    assert ids.shape[0] == 2 and n_images == 1  # the image-only row and the empty row
    assert ids[0].eq(boi).sum() == 2 and ids[1].eq(boi).sum() == 1


def test_parts_diffusion_losses_add_up_to_the_batch_mean_over_generated_images(processor):
    """A part's diffusion loss is its mean over its generated images times their share of the micro-batch's."""
    model = tiny_model()
    objective = TransfusionDiffusionObjective(model.config)
    batch = edit_batch(processor, model.config)
    edit = {k: v[:1] for k, v in batch.items() if k not in ("image_latents", "image_is_input", "pixel_values")}
    edit |= {"image_latents": batch["image_latents"][:2], "image_is_input": batch["image_is_input"][:2]}
    kwargs = dict(image_timesteps=torch.tensor([0, 400]), drop_captions=False)
    alone = objective(model, **edit, **kwargs, generator=torch.Generator().manual_seed(0))
    shared = objective(model, **edit, **kwargs, num_images_in_batch=4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(shared.diffusion_loss, alone.diffusion_loss / 4)  # 1 generated image of 4
