"""The eval CLI on a tiny random pipeline and a random classifier (well-formed, finite, deterministic reports;
--compare), and its metric helpers against hand-computed values."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_model
from diffusers import DDIMScheduler

from pipelines import TransfusionPipeline
from evaluation import evaluate
from evaluation.classifier import FashionClassifier
from training.datasets import SceneSpec, load_fashion_mnist
from evaluation.metrics import frechet_distance

TINY_COUNTS = [
    "--steps", "2", "--num-per-class", "2", "--shapes-prompts", "5", "--caption-per-class", "1",
    "--caption-shapes", "4", "--caption-max-tokens", "3", "--vae-per-class", "2", "--fd-reference-per-class", "10",
    "--text-max-chunks", "3", "--text-window", "16", "--threads", "1", "--edit-prompts", "5", "--instruct-prompts", "3",
    "--qa-questions", "6", "--instruct-fashion-per-class", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("eval")
    model = tiny_model()
    scheduler = DDIMScheduler.from_config(model.config.scheduler_config())
    pipe = TransfusionPipeline(transformer=model, scheduler=scheduler, tokenizer=tokenizer)
    pipe.save_pretrained(root / "pipe")
    torch.manual_seed(0)
    FashionClassifier().eval().save(root / "classifier")
    return root


def run(folders, out, *extra):
    paths = ["--model", str(folders / "pipe"), "--classifier", str(folders / "classifier"), "--out", str(out)]
    return evaluate.main([*paths, *TINY_COUNTS, *extra])


def numbers(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from numbers(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from numbers(v)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield tree


def test_cli_writes_a_complete_report(folders, tmp_path):
    out = tmp_path / "tiny.json"
    run(folders, out, "--text-baseline", str(folders / "pipe"), "--grid")
    report = json.loads(out.read_text())
    assert report["tasks"] == list(evaluate.TASKS)
    for key in ("model", "config", "command", "model_info", "results", "summary", "wall_seconds", "versions"):
        assert key in report
    cfg = report["config"]
    assert (cfg["steps"], cfg["guidance"], cfg["seed"], cfg["num_per_class"]) == (2, 3.0, 0, 2)
    assert cfg["scheduler_class"] == "DDIMScheduler"
    res = report["results"]
    assert set(res) == set(evaluate.TASKS)
    fashion = res["fashion"]
    for key in ("accuracy", "per_class_accuracy", "fd", "fd_vae_reconstruction", "fd_real_vs_real", "fd_ratio_to_vae"):
        assert key in fashion
    assert fashion["n_generated"] == 20 and 0 <= fashion["accuracy"] <= 1
    assert set(res["shapes"]["categories"]) == {"single_object", "two_objects", "counting", "colour", "position"}
    assert res["shapes"]["detector_on_references"]["overall"] == 1.0  # rendered scenes pass the detector
    assert res["caption"]["fashion"]["n"] == 10 and res["caption"]["shapes"]["n"] == 4
    assert {"exact", "class_name"} <= set(res["caption"]["fashion"])
    assert {"exact", "per_attribute"} <= set(res["caption"]["shapes"])
    text = res["text"]
    assert text["perplexity"] == pytest.approx(math.exp(text["nll_per_token"]))
    assert text["baseline"]["same_tokenizer"] and text["perplexity_ratio"] == pytest.approx(1.0)
    assert res["vae"]["n"] == 20
    edit = res["edit"]
    assert edit["n"] == 5 and set(edit["success_by_kind"]) == {"recolour", "move", "add", "remove", "count"}
    assert edit["detector_on_targets"]["success"] == 1.0 and edit["detector_on_targets"]["preserved"] == 1.0
    assert edit["unchanged_source"]["preserved"] == 1.0
    assert res["instruct"]["n"] == 3 and 0 <= res["instruct"]["answered_with_image"] <= 1
    assert res["instruct"]["fashion"]["n"] == 10
    assert res["qa"]["n"] == 6 and sum(res["qa"]["by_kind_n"].values()) == 6
    assert (tmp_path / "tiny-edit.png").exists()
    assert all(math.isfinite(v) for v in numbers(report))
    assert "fashion: FD (generated vs real)" in out.with_suffix(".md").read_text()
    assert (tmp_path / "tiny-fashion.png").exists() and (tmp_path / "tiny-shapes.png").exists()


def test_fashion_is_seeded_per_image(folders, tmp_path):
    """Same seed: the same numbers, whatever the batch size; another seed: other images."""
    a = run(folders, tmp_path / "a.json", "--tasks", "fashion", "--batch-size", "7")["results"]["fashion"]
    b = run(folders, tmp_path / "b.json", "--tasks", "fashion", "--batch-size", "50")["results"]["fashion"]
    c = run(folders, tmp_path / "c.json", "--tasks", "fashion", "--seed", "1")["results"]["fashion"]
    assert a["accuracy"] == b["accuracy"] and a["fd"] == pytest.approx(b["fd"], rel=1e-4)
    assert c["fd"] != pytest.approx(a["fd"], rel=1e-4)


def test_compare_table_and_plot(folders, tmp_path, capsys):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    run(folders, one, "--tasks", "fashion,shapes")
    run(folders, two, "--tasks", "fashion,shapes", "--guidance", "1.0")
    plot, md = tmp_path / "cmp.png", tmp_path / "cmp.md"
    table = evaluate.main(["--compare", str(one), str(two), "--plot", str(plot), "--compare-out", str(md)])
    lines = table.splitlines()
    assert lines[0] == "| metric | one | two |"
    assert any("guidance 3.0" in line and "guidance 1.0" in line for line in lines)
    assert any(line.startswith("| shapes: GenEval overall |") for line in lines)
    assert plot.stat().st_size > 0 and md.read_text() == table


def test_scheduler_swap_keeps_the_noise_schedule_and_applies_overrides(folders):
    pipe = evaluate.load_pipeline(str(folders / "pipe"), "cpu")
    evaluate.set_scheduler(pipe, "dpm", {"algorithm_type": "sde-dpmsolver++"})
    config = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler" and config.algorithm_type == "sde-dpmsolver++"
    assert config.beta_schedule == pipe.transformer.config.scheduler_config()["beta_schedule"]
    message = r"overrides \['algorithm_type'\] are not in DDIMScheduler's config; it takes \[.*'timestep_spacing'"
    with pytest.raises(ValueError, match=message):
        evaluate.set_scheduler(pipe, "ddim", {"algorithm_type": "sde-dpmsolver++"})
    assert evaluate.scheduler_variant(pipe.scheduler) == "sde-dpmsolver++"
    evaluate.set_scheduler(pipe, "ddim")  # built from the DPM-Solver config, which carries algorithm_type along
    assert "algorithm_type" in pipe.scheduler.config and evaluate.scheduler_variant(pipe.scheduler) is None


def test_the_sampler_row_names_the_dpm_solver_variant():
    from evaluation.report import summary_rows

    def sampler(variant, overrides):
        cfg = {"scheduler_class": "DPMSolverMultistepScheduler", "scheduler_variant": variant, "steps": 25,
               "scheduler_config": overrides, "guidance": 3.0}  # fmt: skip
        return summary_rows({"config": cfg})["sampler"]

    assert sampler("sde-dpmsolver++", {}) == "DPMSolverMultistepScheduler (sde-dpmsolver++) 25 steps, guidance 3.0"
    given = sampler("dpmsolver++", {"algorithm_type": "dpmsolver++", "solver_order": 3})
    assert given == "DPMSolverMultistepScheduler (dpmsolver++) 25 steps, solver_order=3, guidance 3.0"
    assert summary_rows({"config": {"scheduler_class": "DDIMScheduler", "steps": 20, "guidance": 1.0}})["sampler"] == (
        "DDIMScheduler 20 steps, guidance 1.0")


def test_scheduler_names_are_checked_against_the_diffusion_type():
    from pipelines.pipeline_transfusion import scheduler_class

    assert scheduler_class("dpm", "ddpm").__name__ == "DPMSolverMultistepScheduler"
    assert scheduler_class("euler", "ddpm").__name__ == "EulerDiscreteScheduler"
    assert scheduler_class("euler", "flow_matching").__name__ == "FlowMatchEulerDiscreteScheduler"
    with pytest.raises(ValueError, match=r"scheduler 'ddim' does not fit a flow_matching model; use flow-euler"):
        scheduler_class("ddim", "flow_matching")
    with pytest.raises(ValueError,
                       match=r"scheduler 'flow-euler' does not fit a ddpm model; use ddim, ddpm, dpm or euler"):
        scheduler_class("flow-euler", "ddpm")
    with pytest.raises(ValueError,
                       match=r"scheduler 'unipc'; expected one of \['ddim', 'ddpm', 'dpm', 'euler', 'flow-euler'\]"):
        scheduler_class("unipc", "ddpm")


def test_bad_flags_are_named():
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--tasks", "fashion,images"])
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--num-per-class", "1"])


def test_frechet_distance_sanity():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 4))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, 2.0, 0.0, 0.0])
    assert frechet_distance(x, x + shift) == pytest.approx(5.0, rel=1e-6)  # |Δμ|² with equal covariances
    expected = x.mean(0) @ x.mean(0) + np.trace(np.cov(x, rowvar=False))  # |μ|² + tr(S + 4S − 2·2S)
    assert frechet_distance(x, 2 * x) == pytest.approx(expected, rel=1e-6)


def test_balanced_indices_are_disjoint_and_balanced():
    _, labels = load_fashion_mnist("test")
    reference, samples = evaluate.balanced_indices(labels, 500, 0), evaluate.balanced_indices(labels, 500, 1)
    assert not set(reference) & set(samples)
    assert np.bincount(labels[reference], minlength=10).tolist() == [500] * 10
    assert np.bincount(labels[samples], minlength=10).tolist() == [500] * 10
    assert set(evaluate.balanced_indices(labels, 3, 1)) <= set(samples)


def test_caption_class():
    assert evaluate.caption_class("a photo of a t-shirt") == 0
    assert evaluate.caption_class("a photo of a shirt") == 6
    assert evaluate.caption_class("a photo of a ankle boot") == 9
    assert evaluate.caption_class("a shirt and a bag") is None
    assert evaluate.caption_class("a red circle") is None


def test_scene_caption_scores():
    truth = SceneSpec("relation", "red", "circle", relation="to the left of", colour2="blue", shape2="square")
    assert evaluate.scene_caption_scores("a red circle to the left of a blue square", truth)["exact"] == 1.0
    assert evaluate.scene_caption_scores("a blue square to the right of a red circle", truth)["exact"] == 1.0
    wrong = evaluate.scene_caption_scores("a red circle above a blue square", truth)
    assert wrong["exact"] == 0.0 and wrong["per_attribute"] == pytest.approx(6 / 7) and wrong["relation"] == 0.0
    fields = ("parsed", "exact", "per_attribute", "kind", "colour", "shape", "count", "relation", "colour2", "shape2")
    assert evaluate.scene_caption_scores("a photo of a bag", truth) == dict.fromkeys(fields, 0.0)
    count = SceneSpec("count", "green", "square", count=2)
    assert evaluate.scene_caption_scores("three green squares", count)["per_attribute"] == pytest.approx(3 / 4)


def test_geneval_overall_is_the_mean_of_categories():
    summary = evaluate.geneval_summary({"a": [True, True, False, False], "b": [True], "c": []})
    assert summary == {"overall": 0.75, "categories": {"a": 0.5, "b": 1.0}}


@pytest.mark.parametrize("n, window, stride", [(1, 4, 2), (5, 4, 2), (9, 4, 2), (100, 16, 8), (7, 8, 3)])
def test_sliding_windows_score_every_token_once(n, window, stride):
    targets = []
    for begin, end, first in evaluate.sliding_windows(n, window, stride):
        assert end - begin <= window and first >= 1
        targets += list(range(begin + first, end))
    assert targets == list(range(1, n))


def test_text_perplexity_matches_the_models_lm_loss(tokenizer):
    """One window covering the whole row: the perplexity is exp of the model's own LM loss on that row."""
    model = tiny_model()
    text = "Return a new list containing all items from the iterable in ascending order."
    result = evaluate.text_perplexity(model, tokenizer, [text], window=128, batch_size=4)
    c = model.config
    ids = torch.tensor([[c.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"], c.eos_token_id]])
    with torch.no_grad():
        lm_loss = model(input_ids=ids, labels=ids).loss
    assert result["tokens"] == ids.shape[1] - 1
    assert result["perplexity"] == pytest.approx(math.exp(float(lm_loss)), rel=1e-5)


def test_evaluation_samples_at_the_pipelines_own_default_step_count(tokenizer):
    from conftest import tiny_model
    from diffusers import DDIMScheduler, DDPMScheduler

    from modeling_transfusion import TransfusionPipeline
    from evaluation.evaluate import default_steps

    model = tiny_model()
    config = model.config.scheduler_config()
    saved = TransfusionPipeline(model, DDIMScheduler.from_config(config), tokenizer, default_inference_steps=7)
    assert default_steps(saved) == 7
    assert default_steps(TransfusionPipeline(model, DDIMScheduler.from_config(config), tokenizer)) == 25
    assert default_steps(TransfusionPipeline(model, DDPMScheduler.from_config(config), tokenizer)) == 250


def test_compare_groups_seeds_into_mean_and_deviation():
    from evaluation.report import compare_table

    def report(accuracy):
        fashion = {"n_generated": 20, "accuracy": accuracy, "fd": 2.0, "fd_vae_reconstruction": 1.0,
                   "fd_real_vs_real": 0.1, "fd_ratio_to_vae": 2.0}  # fmt: skip
        return {"results": {"fashion": fashion}}

    table = compare_table([report(0.5), report(0.7), report(0.9)], ["before", "before", "after"])
    assert "| metric | before (n=2) | after |" in table
    assert "| fashion: prompted-class accuracy | 0.600 ± 0.141 | 0.900 |" in table
    assert "| fashion: images | 20 | 20 |" in table
