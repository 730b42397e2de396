"""The shapes-world detector: exact on clean renders, robust to a little blur, and GenEval-style prompt scoring."""

import os

import numpy as np
import pytest
import torch
from scipy import ndimage

from training.datasets import SceneSpec, heldout_prompts, parse_caption, place_objects, render_scene, shapes_scene
from evaluation.detector import classify_shape, detect, detection_matches_scene, score_prompt

torch.set_num_threads(int(os.environ.get("TRANSFUSION_THREADS", "1")))


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_detector_exact_on_clean_renders(split):
    specs = [shapes_scene(i, split, seed=11) for i in range(300)]
    correct = [detection_matches_scene(s, detect(render_scene(s))) for s in specs]
    assert np.mean(correct) == 1.0


def test_detector_survives_mild_blur():
    """Generated and reconstructed images are soft: a light Gaussian blur must not change the answer much."""
    specs = [shapes_scene(i, "train", seed=12) for i in range(200)]
    correct = []
    for s in specs:
        blurred = ndimage.gaussian_filter(render_scene(s).astype(np.float64), sigma=(0.8, 0.8, 0))
        correct.append(detection_matches_scene(s, detect(np.clip(blurred, 0, 255).astype(np.uint8))))
    assert np.mean(correct) >= 0.95


def test_empty_image_has_no_objects():
    assert detect(np.zeros((32, 32, 3), dtype=np.uint8)) == []
    noise = (np.random.default_rng(0).random((32, 32, 3)) < 0.02) * 255  # isolated bright pixels
    assert detect(noise.astype(np.uint8)) == []


def test_classify_shape_on_masks():
    from training.datasets import shape_mask

    for shape in ("circle", "square", "triangle"):
        for size in (8, 9, 10, 11, 12, 14):
            assert classify_shape(shape_mask(shape, size)) == shape


def test_every_prompt_passes_on_its_own_render():
    for prompt in heldout_prompts(100, seed=3):
        result = score_prompt(prompt.caption, detect(render_scene(prompt.spec)))
        assert result[prompt.category], prompt


def test_score_prompt_fails_the_wrong_image():
    rng = np.random.default_rng(0)
    red_circle = render_scene(place_objects(rng, SceneSpec("single", "red", "circle")))
    assert score_prompt("a blue circle", detect(red_circle)) == {"single_object": True, "colour": False}
    assert score_prompt("a red square", detect(red_circle)) == {"single_object": False, "colour": False}
    assert score_prompt("two red circles", detect(red_circle)) == {"counting": False}

    left_of = SceneSpec("relation", "red", "circle", relation="to the left of", colour2="blue", shape2="square")
    spec = place_objects(rng, left_of)
    dets = detect(render_scene(spec))
    assert score_prompt(spec, dets) == {"two_objects": True, "position": True}
    assert score_prompt("a red circle to the right of a blue square", dets) == {"two_objects": True, "position": False}
    assert score_prompt("a blue square to the right of a red circle", dets) == {"two_objects": True, "position": True}
    assert score_prompt("a red circle above a blue square", dets)["position"] is False
    assert score_prompt("a red circle to the left of a green square", dets)["two_objects"] is False

    three = place_objects(rng, SceneSpec("count", "green", "triangle", count=3))
    assert score_prompt("three green triangles", detect(render_scene(three))) == {"counting": True}
    assert score_prompt("two green triangles", detect(render_scene(three))) == {"counting": False}


def test_parse_caption_then_score_uses_the_same_spec():
    spec = shapes_scene(1, "heldout")
    detections = detect(render_scene(spec))
    assert score_prompt(spec.caption, detections) == score_prompt(parse_caption(spec.caption), detections)


def test_edit_scores_of_true_targets_and_unchanged_sources():
    """Every held-out edit's true result passes and keeps the rest; leaving the source unchanged fails every edit
    that must change what is there (a move may already hold in the source, so it is left out)."""
    from evaluation.detector import score_edit
    from training.datasets.instruct import heldout_edits, render_objects

    for edit in heldout_edits(60):
        assert score_edit(edit, detect(render_objects(edit.target))) == {"success": True, "preserved": True}, edit
        unchanged = score_edit(edit, detect(render_objects(edit.source)))
        assert unchanged["preserved"] or edit.kind == "count"
        if edit.kind != "move":
            assert not unchanged["success"], edit
