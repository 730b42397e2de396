"""LoRA on a tiny Transfusion: adapters change outputs, save/load round trips, pipeline load/fuse/unload, merging,
the frozen VAE, bad input, the fine-tuning script and the concept renderer/detector."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import outside_repo_env, tiny_model
from diffusers import DDIMScheduler

from pipelines import TransfusionPipeline
from experiments.lora_concept import _concept_spec, concept_world, detect_concept_objects, render_objects
from training.finetune_lora import main
from training.lora import DEFAULT_TARGETS, add_lora

torch.set_num_threads(1)


def ids_and_latents(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, 300, (2, 6), generator=g)
    image = torch.tensor([[3] + [5] * 16 + [4]] * 2)  # <|boi|> 16 slots <|eoi|>
    return torch.cat([ids, image, ids[:, :3]], dim=1), torch.randn(2, 4, 8, 8, generator=g)


def run(model, seed=0):
    """Text logits and image predictions of one forward with an image at t = 300."""
    ids, latents = ids_and_latents(seed)
    with torch.no_grad():
        out = model(input_ids=ids, image_latents=latents, image_timesteps=torch.tensor([300, 300]))
    return out.logits, out.image_predictions


def assert_same(a, b, **kw):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **kw)


# Outputs of weights loaded from a file: safetensors memory-maps them, and another alignment can pick another float32
# CPU kernel (differences of ~1e-7 on some machines). The same tensors in memory compare bit for bit.
LOADED = {"atol": 1e-5, "rtol": 1e-5}


def lora_model(seed=0, **kwargs):
    return add_lora(tiny_model(seed), rank=4, init_lora_weights=False, **kwargs).eval()


@pytest.fixture()
def adapter_dir(tmp_path):
    peft_model = lora_model()
    peft_model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", run(peft_model)


def make_pipe(tokenizer, model=None):
    model = model if model is not None else tiny_model(0)
    pipe = TransfusionPipeline(
        transformer=model, scheduler=DDIMScheduler.from_config(model.config.scheduler_config()), tokenizer=tokenizer
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe):
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    return pipe("a red circle", num_inference_steps=2, guidance_scale=2.0, latents=noise, output_type="latent").images


def test_adapter_changes_outputs_and_zero_init_does_not():
    base = run(tiny_model(0))
    assert_same(run(add_lora(tiny_model(0), rank=4).eval()), base)  # default init: B = 0
    adapted = run(lora_model())
    assert not torch.allclose(adapted[0], base[0]) and not torch.allclose(adapted[1], base[1])


def test_targets_only_backbone_projections_never_the_vae():
    model = lora_model()
    adapted = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert len(adapted) == 2 * len(DEFAULT_TARGETS)
    assert all(".layers." in n and n.rsplit(".", 1)[-1] in DEFAULT_TARGETS for n in adapted)
    vae = model.base_model.model.model.vae
    assert not any("lora" in n for n, _ in vae.named_parameters())
    assert not any(p.requires_grad for p in vae.parameters())


def test_save_then_load_adapter_on_fresh_model_is_identical(adapter_dir):
    folder, expected = adapter_dir
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert set(saved["target_modules"]) == set(DEFAULT_TARGETS)
    fresh = tiny_model(0)
    fresh.load_adapter(str(folder))
    assert_same(run(fresh), expected, **LOADED)


def test_merge_and_unload_equals_active_adapter():
    model = lora_model()
    expected = run(model)
    merged = model.merge_and_unload()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert_same(run(merged), expected, atol=2e-5, rtol=1e-5)


def test_pipeline_load_fuse_unload(tokenizer, adapter_dir, tmp_path):
    folder, expected = adapter_dir
    pipe = make_pipe(tokenizer)
    base_run, base_sample = run(pipe.transformer), sample(pipe)
    base_weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}

    pipe.load_lora_weights(folder)
    assert_same(run(pipe.transformer), expected, **LOADED)
    adapted_sample = sample(pipe)
    assert not torch.allclose(adapted_sample, base_sample)

    pipe.unload_lora_weights()  # not fused: back to the base model exactly
    assert_same(run(pipe.transformer), base_run, rtol=0, atol=0)
    assert not hasattr(pipe.transformer, "peft_config")
    assert {k: v for k, v in pipe.transformer.state_dict().items()}.keys() == base_weights.keys()

    pipe.load_lora_weights(folder)
    with pytest.raises(ValueError, match=r"A LoRA adapter is loaded.*fuse_lora\(\) then pipe.unload_lora_weights\(\)"):
        pipe.save_pretrained(tmp_path / "refused")
    pipe.fuse_lora()
    assert_same(run(pipe.transformer), expected, atol=2e-5, rtol=1e-5)
    pipe.unload_lora_weights()  # fused weights stay, LoRA layers go
    assert not any("lora" in k for k in pipe.transformer.state_dict())
    assert_same(run(pipe.transformer), expected, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(sample(pipe), adapted_sample, atol=1e-4, rtol=1e-4)

    # saved after fuse + unload: plain keys, and the reload computes the fused model
    pipe.save_pretrained(tmp_path / "fused")
    reloaded = TransfusionPipeline.from_pretrained(tmp_path / "fused")
    assert_same(run(reloaded.transformer), expected, atol=2e-5, rtol=1e-5)


def test_pipeline_lora_on_a_loaded_checkpoint_keeps_saving_plain_keys(tokenizer, adapter_dir, tmp_path):
    folder, expected = adapter_dir
    make_pipe(tokenizer).save_pretrained(tmp_path / "base")
    pipe = TransfusionPipeline.from_pretrained(tmp_path / "base")
    trainable = {n: p.requires_grad for n, p in pipe.transformer.named_parameters()}
    pipe.load_lora_weights(folder)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert {n: p.requires_grad for n, p in pipe.transformer.named_parameters()} == trainable
    pipe.save_pretrained(tmp_path / "again")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "again" / "transformer" / "model.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if k.startswith("base_model.")]  # plain keys, not the adapter's prefix
    reloaded = TransfusionPipeline.from_pretrained(tmp_path / "again")
    assert_same(run(reloaded.transformer), expected, atol=2e-5, rtol=1e-5)



def test_unknown_target_module_is_a_clear_error():
    with pytest.raises(ValueError, match=r"qq_proj.*q_proj"):
        add_lora(tiny_model(0), targets=["q_proj", "qq_proj"])
    with pytest.raises(ValueError, match="Unknown LoRA target"):
        add_lora(tiny_model(0), targets="to_q")  # a VAE layer name: the VAE is not adaptable


def test_adapter_for_another_base_model_is_a_clear_error(tokenizer, adapter_dir):
    folder, _ = adapter_dir
    pipe = make_pipe(tokenizer, tiny_model(0, hidden_size=64, intermediate_size=96))
    with pytest.raises(ValueError, match=r"does not fit this model.*gate_proj: "
                       r"adapter lora_A \[4, 32\] needs input size 32, the layer has 64"):
        pipe.load_lora_weights(folder)
    assert not getattr(pipe.transformer, "_hf_peft_config_loaded", False)  # nothing half-loaded
    deeper = make_pipe(tokenizer, tiny_model(0, num_hidden_layers=1))
    with pytest.raises(ValueError, match=r"model.layers.1.*no such layer"):
        deeper.load_lora_weights(folder)
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json: it is not a PEFT adapter folder"):
        make_pipe(tokenizer).load_lora_weights(folder.parent)


def write_folder(folder, n=4):
    folder.mkdir()
    rng = np.random.default_rng(0)
    palette, _ = concept_world("purple")
    for i in range(n):
        caption, objects = _concept_spec(rng, "purple")
        PIL.Image.fromarray(render_objects(objects, palette)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    (folder.parent / "extra.jsonl").write_text(json.dumps({"text": "a line of plain text"}) + "\n")


def test_finetune_script_writes_a_loadable_adapter(tokenizer, tmp_path, capsys):
    make_pipe(tokenizer).save_pretrained(tmp_path / "base")
    write_folder(tmp_path / "data")
    (tmp_path / "notes.txt").write_text("first text row\n\nsecond text row\n")
    out = tmp_path / "adapter"
    main(["--base", str(tmp_path / "base"), "--data", str(tmp_path / "data"), "--data", str(tmp_path / "extra.jsonl"),
          "--text", str(tmp_path / "notes.txt"), "--steps", "3", "--batch-size", "3", "--output", str(out),
          "--threads", "1", "--log-every", "1", "--train-patch-modules",
          "--latent-cache", str(tmp_path / "cache")])  # fmt: skip
    printed = capsys.readouterr().out
    assert f"wrote the LoRA adapter to {out / 'final'}" in printed
    assert (out / "final" / "adapter_model.safetensors").exists() and (out / "final" / "adapter_config.json").exists()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]  # training.train's log
    assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in log)
    assert list((tmp_path / "cache").glob("latents-data0-n4-u*.safetensors"))  # training.train's readers and cache
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert set(config["modules_to_save"]) == {"patch_encoder", "patch_decoder", "time_embed"}

    pipe = TransfusionPipeline.from_pretrained(tmp_path / "base")
    base = run(pipe.transformer)
    pipe.load_lora_weights(out / "final")
    adapted = run(pipe.transformer)
    assert not torch.allclose(adapted[1], base[1])  # the trained patch modules and LoRA act
    pipe.unload_lora_weights()
    assert_same(run(pipe.transformer), base, rtol=0, atol=0)


def test_finetune_help_and_data_errors(tokenizer, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "--train-patch-modules" in capsys.readouterr().out
    make_pipe(tokenizer).save_pretrained(tmp_path / "base")
    (tmp_path / "d").mkdir()
    for i in range(2):
        PIL.Image.new("RGB", (32, 32)).save(tmp_path / "d" / f"{i}.png")
    (tmp_path / "d" / "0.txt").write_text("a caption")
    (tmp_path / "bad.jsonl").write_text('{"image": "missing.png", "text": "x"}\n')
    base = ["--base", str(tmp_path / "base"), "--steps", "1", "--latent-cache", str(tmp_path / "cache")]
    for data, message in ((tmp_path / "d", r"the images \['1.png'\] have no caption file beside them"),
                          (tmp_path / "bad.jsonl",
                           r"bad.jsonl row 0: the image .*missing.png cannot be read")):  # fmt: skip
        with pytest.raises(SystemExit, match=message):
            main([*base, "--data", str(data), "--output", str(tmp_path / "out")])


@pytest.mark.parametrize("concept", ["purple", "cross"])
def test_concept_renderer_and_detector_agree(concept):
    from training.datasets import shapes_images
    from evaluation.detector import detect

    palette, _ = concept_world(concept)
    rng = np.random.default_rng(5)
    for _ in range(40):
        caption, objects = _concept_spec(rng, concept)
        assert concept in caption.split() or f"{concept}es" in caption.split(), caption
        found = sorted(detect_concept_objects(render_objects(objects, palette), palette))
        assert found == sorted((o.colour, o.shape) for o in objects), caption
    images, captions = shapes_images(40, "train", seed=3)  # the old world reads exactly as the shapes detector reads it
    for image, caption in zip(images, captions):
        expected = sorted((d.colour, d.shape) for d in detect(image))
        assert sorted(detect_concept_objects(image, palette)) == expected, caption


def test_load_lora_weights_through_remote_code_in_a_fresh_process(tokenizer, adapter_dir, tmp_path):
    """A pipeline folder loaded with DiffusionPipeline(..., trust_remote_code=True) where this repository cannot be
    imported: the pipeline file stored in the folder carries load/fuse/unload."""
    import subprocess
    import sys
    import textwrap

    folder, (expected_logits, _) = adapter_dir
    make_pipe(tokenizer).save_pretrained(tmp_path / "base")
    ids, _ = ids_and_latents()
    torch.save({"ids": ids[:, :6], "logits": expected_logits[:, :6]}, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import torch
        from diffusers import DiffusionPipeline
        torch.set_num_threads(1)
        pipe = DiffusionPipeline.from_pretrained({str(tmp_path / "base")!r}, trust_remote_code=True)
        assert type(pipe).__name__ == "TransfusionPipeline" and "transfusion" not in type(pipe).__module__.split(".")[0]
        ref = torch.load({str(tmp_path / "expected.pt")!r})
        pipe.load_lora_weights({str(folder)!r})
        with torch.no_grad():
            torch.testing.assert_close(pipe.transformer(input_ids=ref["ids"]).logits, ref["logits"],
                                       atol=1e-5, rtol=1e-5)
            pipe.fuse_lora()
            pipe.unload_lora_weights()
            torch.testing.assert_close(pipe.transformer(input_ids=ref["ids"]).logits, ref["logits"],
                                       atol=2e-5, rtol=1e-5)
        pipe.save_pretrained({str(tmp_path / "fused")!r})
        assert not any(k.startswith("base_model") for k in pipe.transformer.state_dict())
        print("ok")
    """)
    env = outside_repo_env(tmp_path, {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf")})
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env=env)  # fmt: skip
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
    reloaded = TransfusionPipeline.from_pretrained(tmp_path / "fused")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.transformer(input_ids=ids[:, :6]).logits, expected_logits[:, :6],
                                   atol=2e-5, rtol=1e-5)  # fmt: skip


def test_a_lora_run_resumes_on_the_same_curve(tokenizer, tmp_path):
    """The LoRA script trains through training.train, so it checkpoints and resumes as pre-training does: a run stopped
    at step 2 and resumed equals the straight run, loss for loss and byte for byte."""
    from training import train as training
    from training.finetune_lora import build_parser, train_argv

    make_pipe(tokenizer).save_pretrained(tmp_path / "base")
    write_folder(tmp_path / "data", n=6)
    common = ["--base", str(tmp_path / "base"), "--data", str(tmp_path / "data"), "--steps", "4", "--batch-size", "2",
              "--threads", "1", "--log-every", "1", "--latent-cache", str(tmp_path / "cache")]  # fmt: skip
    main([*common, "--output", str(tmp_path / "straight")])
    interrupted = train_argv(build_parser().parse_args([*common, "--output", str(tmp_path / "resumed")]))
    training.main([*interrupted, "--stop-at-step", "2"])
    main([*common, "--output", str(tmp_path / "resumed"), "--resume"])

    def curve(run):
        return [json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]

    assert curve("resumed") == curve("straight") and len(curve("straight")) == 4
    adapter = "final/adapter_model.safetensors"
    assert (tmp_path / "resumed" / adapter).read_bytes() == (tmp_path / "straight" / adapter).read_bytes()
