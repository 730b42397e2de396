"""The data world: Fashion-MNIST loading, the shapes world and its held-out split, the text corpus, and the small
evaluation helpers (Fréchet distance, VAE save/load). Needs no trained checkpoint."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from training import datasets
from training.datasets import fashion_mnist
from training.datasets import shapes as world
from training.datasets import (
    COLOURS,
    FASHION_CLASSES,
    SHAPES,
    FashionDataset,
    ShapesDataset,
    TextDataset,
    fashion_caption,
    fashion_to_tensor,
    heldout_prompts,
    load_fashion_mnist,
    parse_caption,
    relation_holds,
    render_scene,
    shapes_scene,
    text_corpus,
)
from training.datasets.shapes import HELDOUT_COUNTS, HELDOUT_RELATION_PAIRS, is_heldout, sample_scene
from training.datasets.text import text_split_of
from evaluation.metrics import frechet_distance

ROOT = Path(__file__).resolve().parents[1]

torch.set_num_threads(int(os.environ.get("TRANSFUSION_THREADS", "1")))

needs_fashion = pytest.mark.skipif(not fashion_mnist.FASHION_DIR.is_dir(),
                                   reason="apt-get install -y dataset-fashion-mnist")


# ------------------------------------------------------------------------------------------------ Fashion-MNIST


@needs_fashion
def test_fashion_loader_shapes_and_labels():
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    assert train_x.shape == (60_000, 28, 28) and train_x.dtype == np.uint8
    assert test_x.shape == (10_000, 28, 28) and test_y.shape == (10_000,)
    assert train_y.dtype == np.int64 and set(np.unique(train_y)) == set(range(10))
    assert np.bincount(test_y).tolist() == [1000] * 10  # the test split is balanced


@needs_fashion
def test_fashion_dataset_item():
    image, caption = FashionDataset("test")[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert -1.0 <= image.min() and image.max() <= 1.0
    assert caption == fashion_caption(load_fashion_mnist("test")[1][0])


def test_fashion_missing_folder_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "FASHION_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("train")
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation", folder=tmp_path)


def test_fashion_folder_from_environment(tmp_path):
    """FASHION_MNIST_DIR replaces the Debian folder (read when the module is imported: run in a fresh process)."""
    code = "from training.datasets import fashion_mnist as f; print(f.FASHION_DIR); f.load_fashion_mnist('test')"
    env = {**os.environ, "FASHION_MNIST_DIR": str(tmp_path / "elsewhere")}
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode != 0 and run.stdout.strip() == str(tmp_path / "elsewhere")
    assert "FASHION_MNIST_DIR" in run.stderr and "elsewhere not found" in run.stderr


def test_fashion_to_tensor_pads_with_background_and_repeats_grey():
    images = np.full((2, 28, 28), 255, dtype=np.uint8)
    images[1] = 0
    x = fashion_to_tensor(images)
    assert x.shape == (2, 3, 32, 32)
    assert torch.all(x[0, :, 2:30, 2:30] == 1.0)
    assert torch.all(x[:, :, :2] == -1.0) and torch.all(x[:, :, :, 30:] == -1.0)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    assert torch.all(x[1] == -1.0)


def test_fashion_captions():
    assert len(FASHION_CLASSES) == 10
    assert fashion_caption(9) == "a photo of a ankle boot"
    assert fashion_caption(0) == "a photo of a t-shirt"


# ------------------------------------------------------------------------------------------------ shapes world


def test_shapes_deterministic_for_a_seed():
    a = [sample_scene(np.random.default_rng(7)) for _ in range(3)]
    b = [sample_scene(np.random.default_rng(7)) for _ in range(3)]
    assert a == b
    assert np.array_equal(render_scene(a[0]), render_scene(b[0]))
    assert shapes_scene(5, "train", seed=1) == shapes_scene(5, "train", seed=1)
    assert shapes_scene(5, "train", seed=1) != shapes_scene(6, "train", seed=1)
    ds = ShapesDataset("train", length=10, seed=3)
    x1, c1 = ds[4]
    x2, c2 = ShapesDataset("train", length=10, seed=3)[4]
    assert torch.equal(x1, x2) and c1 == c2 and x1.shape == (3, 32, 32)


def test_render_uses_exact_palette_on_black():
    for i in range(50):
        image = render_scene(shapes_scene(i))
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        colours = {tuple(int(v) for v in p) for p in image.reshape(-1, 3)}
        assert colours <= {(0, 0, 0), *COLOURS.values()}


def _objects_apart(spec) -> bool:
    objs = spec.objects
    for i, a in enumerate(objs):
        for b in objs[i + 1 :]:
            if not world._boxes_apart(a, b):
                return False
    return True


def test_scene_contents_match_their_captions():
    for i in range(500):
        spec = shapes_scene(i)
        n = {"single": 1, "relation": 2, "count": spec.count}[spec.kind]
        assert len(spec.objects) == n and 1 <= n <= 3
        assert _objects_apart(spec)
        for o in spec.objects:
            assert world.BORDER <= o.x and o.x + o.size <= 32 - world.BORDER and 9 <= o.size <= 11
        if spec.kind == "relation":
            a, b = spec.objects
            assert (a.colour, a.shape, b.colour, b.shape) == (spec.colour, spec.shape, spec.colour2, spec.shape2)
            assert (a.colour, a.shape) != (b.colour, b.shape)
        else:
            assert all((o.colour, o.shape) == (spec.colour, spec.shape) for o in spec.objects)


def test_relations_geometrically_true_with_margin():
    seen = set()
    for i in range(3000):
        spec = shapes_scene(i)
        if spec.kind != "relation":
            continue
        seen.add(spec.relation)
        a, b = spec.objects
        assert relation_holds(a.box_centre, b.box_centre, spec.relation)
        # the mask's own pixel centroids (what a detector sees) also satisfy it, by a wide margin
        ca, cb = _mask_centroid(a), _mask_centroid(b)
        assert relation_holds(ca, cb, spec.relation)
        dx, dy = cb[0] - ca[0], cb[1] - ca[1]
        along = {"to the left of": dx, "to the right of": -dx, "above": dy, "below": -dy}[spec.relation]
        across = dy if spec.relation in ("to the left of", "to the right of") else dx
        assert along >= 9 and abs(across) <= 5  # triangles' centroids sit 1-2 px below their box centres
        # and no other relation holds
        assert [r for r in world.RELATIONS if relation_holds(ca, cb, r)] == [spec.relation]
    assert seen == set(world.RELATIONS)


def _mask_centroid(obj):
    ys, xs = np.nonzero(world.shape_mask(obj.shape, obj.size))
    return (obj.x + xs.mean() + 0.5, obj.y + ys.mean() + 0.5)


def test_heldout_combinations_never_in_train_split():
    kinds = set()
    for i in range(4000):
        spec = shapes_scene(i, "train")
        kinds.add(spec.kind)
        assert not is_heldout(spec), spec.caption
        if spec.kind == "relation":
            pair = frozenset({(spec.colour, spec.shape), (spec.colour2, spec.shape2)})
            assert pair not in HELDOUT_RELATION_PAIRS
        if spec.kind == "count":
            assert (spec.count, spec.colour, spec.shape) not in HELDOUT_COUNTS
    assert kinds == {"single", "relation", "count"}
    for i in range(300):
        assert is_heldout(shapes_scene(i, "heldout"))


def test_every_single_object_pair_is_in_training():
    singles = {(s.colour, s.shape) for s in (shapes_scene(i) for i in range(2000)) if s.kind == "single"}
    assert singles == {(c, s) for c in COLOURS for s in SHAPES}


def test_caption_parser_round_trip():
    for i in range(500):
        spec = shapes_scene(i, "train" if i % 2 else "heldout")
        assert parse_caption(spec.caption) == spec.semantic()
    for caption in datasets.all_captions()[10:]:
        assert parse_caption(caption).caption == caption
    with pytest.raises(ValueError):
        parse_caption("a purple circle")
    with pytest.raises(ValueError):
        parse_caption("a photo of a dress")


def test_heldout_prompts_categories_and_determinism():
    prompts = heldout_prompts(50, seed=0)
    assert prompts == heldout_prompts(50, seed=0)
    assert {p.category for p in prompts} == set(world.EVAL_CATEGORIES)
    for caption, spec, category in prompts:
        assert caption == spec.caption and spec.objects
        if category in ("two_objects", "position"):
            assert spec.kind == "relation" and is_heldout(spec)
        elif category == "counting":
            assert spec.kind == "count" and is_heldout(spec)
        else:
            assert spec.kind == "single"


# ------------------------------------------------------------------------------------------------ text


def test_text_corpus_split_deterministic_and_disjoint():
    train, heldout = text_corpus("train"), text_corpus("heldout")
    assert len(train) > 1000 and len(heldout) > 50
    assert 0.02 < len(heldout) / (len(train) + len(heldout)) < 0.08
    assert not set(train) & set(heldout)
    assert all(text_split_of(t) == "heldout" for t in heldout)
    assert text_split_of(heldout[0]) == text_split_of(heldout[0])
    assert all(t.isascii() and "  " not in t and "\n" not in t for t in train[:500])
    assert TextDataset("heldout")[0] == heldout[0]


# ------------------------------------------------------------------------------------------------ metrics


def test_frechet_distance_zero_for_identical_and_positive_for_shifted():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8))
    assert abs(frechet_distance(a, a)) < 1e-6
    shifted = frechet_distance(a, a + 1.0)
    assert shifted == pytest.approx(8.0, rel=1e-3)  # |mu shift|^2 = 8, covariances equal
    assert frechet_distance(a, rng.normal(size=(500, 8)) * 2) > 1.0
    with pytest.raises(ValueError):
        frechet_distance(a, a[:, :4])


def test_vae_save_load_round_trip(tmp_path):
    from diffusers import AutoencoderKL

    from training.train_vae import build_vae, latent_scaling_factor

    torch.manual_seed(0)
    vae = build_vae(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    vae.register_to_config(scaling_factor=latent_scaling_factor(vae, x))
    vae.save_pretrained(tmp_path)
    loaded = AutoencoderKL.from_pretrained(tmp_path).eval()
    assert loaded.config.scaling_factor == pytest.approx(vae.config.scaling_factor)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        assert z.shape == (2, 4, 16, 16)
        # weights bit for bit; outputs up to float32 kernel choice (loaded tensors are memory-mapped)
        assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), loaded.state_dict().values()))
        torch.testing.assert_close(loaded.encode(x).latent_dist.mode(), z, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded.decode(z).sample, vae.decode(z).sample, atol=1e-5, rtol=1e-5)


def test_classifier_save_load_round_trip(tmp_path):
    from evaluation.classifier import FashionClassifier, load_classifier

    torch.manual_seed(0)
    model = FashionClassifier().eval()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    model.save(tmp_path, test_accuracy=0.5)
    loaded = load_classifier(tmp_path)
    with torch.no_grad():
        assert model.features(x).shape == (4, model.config.feature_dim)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
        torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=1e-5)  # float32 kernel choice may differ
    assert loaded.embed(x).shape == (4, 128) and loaded.predict(x).shape == (4,)
    with pytest.raises(FileNotFoundError, match="evaluation.classifier"):
        load_classifier(tmp_path / "missing")


def test_frechet_distance_matches_scipy_sqrtm_and_survives_dead_features():
    from scipy import linalg

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(400, 6)), rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 0.5
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    diff = a.mean(0) - b.mean(0)
    reference = diff @ diff + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert frechet_distance(a, b) == pytest.approx(reference, rel=1e-8)
    dead = np.concatenate([a, np.zeros((400, 3))], axis=1)  # ReLU units that never fire: singular covariance
    assert frechet_distance(dead, dead) == pytest.approx(0.0, abs=1e-8)
    assert np.isfinite(frechet_distance(dead, np.concatenate([b[:300], np.zeros((300, 3))], axis=1)))


def test_reconstruction_reports_run_on_a_tiny_vae():
    from evaluation.classifier import FashionClassifier
    from evaluation.metrics import shapes_reconstruction_report, vae_reconstruction_report
    from training.train_vae import build_vae

    torch.manual_seed(0)
    vae = build_vae(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4)
    shapes = shapes_reconstruction_report(vae, n=4)
    assert shapes["detector_exact_original"] == 1.0 and 0.0 <= shapes["detector_exact_reconstruction"] <= 1.0
    if fashion_mnist.FASHION_DIR.is_dir():
        report = vae_reconstruction_report(vae, FashionClassifier().eval(), n=8)
        assert report["n"] == 8 and 0.0 <= report["accuracy_reconstruction"] <= 1.0 and report["mse"] > 0
