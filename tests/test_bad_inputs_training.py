"""Bad inputs to the training and conversion scripts: each case gets an error that names the flag, key or file and
what is allowed, never a trace from deep inside a library or a silent run.

Surfaces: the training command line and its --config file, the latent cache, checkpoint writes, LoRA adapter
folders, the converters' inputs.
"""

import errno
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TOKENIZER_TEXT, tiny_model
from safetensors.torch import save_file

from training import train as train_script

# ----------------------------------------------------------------------------------------------------------------
# Training command line and --config
# ----------------------------------------------------------------------------------------------------------------

CONFIG_CASES = [  # (file name, text, what the message must say)
    ("syntax.yaml", "batch_size: [1, 2\nlr: 0.1\n", r"syntax\.yaml: not valid YAML"),
    ("syntax.json", '{"batch_size": 4,}', r"syntax\.json: not valid JSON"),
    ("list.yaml", "- batch_size\n", r"list\.yaml: expected a mapping of flag names"),
    ("float.yaml", "batch_size: 2.5\n", r"float\.yaml: batch_size \(--batch-size\): 2\.5 is not an integer"),
    ("pair.yaml", "batch_size: [1, 2]\n", r"pair\.yaml: batch_size \(--batch-size\): \[1, 2\] is not an integer"),
    ("bool.yaml", "batch_size: true\n", r"batch_size \(--batch-size\): True is not an integer"),
    ("lr.yaml", "lr: fast\n", r"lr \(--lr\): 'fast' is not a number"),
    ("choice.yaml", "patch_encoder: conv\n", r"patch_encoder \(--patch-encoder\): 'conv' is not one of linear, unet"),
    ("betas.yaml", "betas: [0.9]\n", r"betas \(--betas\): \[0\.9\] is not 2 values"),
    ("flag.yaml", "gradient_checkpointing: yes please\n",
     r"gradient_checkpointing .*'yes please' is not true or false"),
    ("kwargs.yaml", "model_kwargs: [1]\n", r"model_kwargs .*is not a mapping of TransfusionConfig fields"),
    ("mix.yaml", "mix: [1, 2]\n", r"--mix \[1, 2\]: expected name=weight pairs"),
    ("first.yaml", "image_first_prob: [1, 2]\n", r"image_first_prob \[1, 2\]: expected a probability"),
    ("clip.yaml", "clip: .nan\n", r"--clip=nan: must be a finite number"),
]


@pytest.mark.parametrize("name, text, message", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_file_errors_name_the_file_the_key_and_what_it_takes(name, text, message, tmp_path, capsys):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        train_script.parse_args(["--config", str(path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert re.search(message, err), err
    if "--clip" not in message and "--mix" not in message and "image_first_prob" not in message:
        assert str(path) in err


def test_config_values_are_converted_as_on_the_command_line(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("batch_size: '8'\nlr: 1\nbetas: [0.8, 0.9]\nsplit_text: false\nmix: {fashion: 1}\n")
    args = train_script.parse_args(["--config", str(path)])
    assert (args.batch_size, args.lr, args.betas, args.split_text) == (8, 1.0, [0.8, 0.9], False)
    assert isinstance(args.lr, float) and isinstance(args.batch_size, int)


FLAG_CASES = [  # (flags, what the message must say)
    (["--mix", "fashion=nan,text=1"], r"--mix .*must be finite numbers ≥ 0"),
    (["--mix", "fashion=inf"], r"--mix .*must be finite numbers ≥ 0"),
    (["--mix", "fashion=-1,text=1"], r"--mix .*must be finite numbers ≥ 0"),
    (["--clip", "nan"], r"--clip=nan: must be a finite number"),
    (["--clip", "-1"], r"--clip=-1\.0: must be ≥ 0 \(0 disables clipping\)"),
    (["--max-examples", "0"], r"--max-examples=0: must be ≥ 1"),
    (["--lr", "inf"], r"--lr=inf: must be a finite number"),
    (["--lr", "-0.1"], r"--lr=-0\.1: must be ≥ 0"),
    (["--eps", "0"], r"--eps=0\.0: must be > 0"),
    (["--betas", "0.9", "1.0"], r"--betas=1\.0: must be ≥ 0, below 1"),
    (["--caption-drop", "1.5"], r"--caption-drop=1\.5: must be ≥ 0 and ≤ 1"),
    (["--min-lr-ratio", "nan"], r"--min-lr-ratio=nan: must be a finite number"),
    (["--minutes", "0"], r"--minutes=0\.0: must be > 0"),
    (["--minutes", "inf"], r"--minutes=inf: must be a finite number"),
    (["--max-text-tokens", "1"], r"--max-text-tokens=1: must be ≥ 2"),
    (["--workers", "-1"], r"--workers=-1: must be ≥ 0"),
    (["--save-every", "-3"], r"--save-every=-3: must be ≥ 0"),
    (["--stop-at-step", "0"], r"--stop-at-step=0: must be ≥ 1"),
    (["--image-first-prob", "nan"], r"probabilities in \[0, 1\]"),
    (["--model-kwargs", "{rms"], r"--model-kwargs: .*is not JSON"),
    (["--model-kwargs", "[1]"], r"--model-kwargs: .*expected a JSON object"),
]


@pytest.mark.parametrize("argv, message", FLAG_CASES, ids=[" ".join(c[0]) for c in FLAG_CASES])
def test_flag_errors_name_the_flag_and_the_allowed_values(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_script.parse_args(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and re.search(message, err), err


# ----------------------------------------------------------------------------------------------------------------
# Latent cache and checkpoint writes (tiny runs)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from diffusers import AutoencoderKL

    from modeling_transfusion import build_tokenizer

    root = tmp_path_factory.mktemp("bad-train-assets")
    build_tokenizer(TOKENIZER_TEXT, vocab_size=300).save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[8, 8, 8], layers_per_block=1, latent_channels=4,
        norm_num_groups=4, sample_size=32,
    ).save_pretrained(root / "vae")  # fmt: skip
    return root


def _flags(assets: Path, out: Path, *extra) -> list[str]:
    return [
        "--config", str(ROOT / "training/configs/tiny-debug.yaml"), "--tokenizer", str(assets / "tokenizer"),
        "--vae", str(assets / "vae"), "--latent-cache", str(assets / "latents"), "--output-dir", str(out),
        "--batch-size", "2", "--max-examples", "8", "--mix", "shapes=1", "--max-steps", "1", "--threads", "1", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_a_damaged_latent_cache_is_named_with_the_re_encode_hint(damage, assets, tmp_path, capsys):
    train_script.main(_flags(assets, tmp_path / "first"))  # writes the cache
    (cache,) = (assets / "latents").glob("latents-shapes-*.safetensors")
    data = cache.read_bytes()
    cache.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x80\x04garbage"}[damage])
    try:
        with pytest.raises(SystemExit) as exit_info:
            train_script.main(_flags(assets, tmp_path / "second"))
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Traceback" not in err
        assert f"latent cache {cache} is unreadable" in err and "delete it to re-encode" in err
    finally:
        cache.unlink()


def test_a_safetensors_write_error_on_a_full_disk_names_the_file(assets, tmp_path, capsys, monkeypatch):
    """safetensors reports a full disk as its own SafetensorError, not as an OSError."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    train_script.main(_flags(assets, tmp_path / "first"))  # the latent cache exists
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "full"
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(_flags(assets, out))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert str(out / "checkpoints/step-1.tmp/model.safetensors") in err and "no space left on device" in err
    assert "there is no earlier checkpoint" in err and not (out / "checkpoints/step-1.tmp").exists()

    for cache in (assets / "latents").glob("*.safetensors"):
        cache.unlink()
    with pytest.raises(SystemExit) as exit_info:  # the latent cache, written before any step
        train_script.main(_flags(assets, tmp_path / "full-cache"))
    err = capsys.readouterr().err
    assert re.search(
        r"could not write latent cache .*latents-shapes-.*\.safetensors: no space left on device", err
    ), err
    assert not list((assets / "latents").glob("*.tmp*"))


def test_a_checkpoint_write_error_other_than_disk_full_is_named_too(assets, tmp_path, capsys, monkeypatch):
    from training import checkpoints

    def read_only(folder):
        raise PermissionError(errno.EACCES, "Permission denied", str(folder / "manifest.json"))

    monkeypatch.setattr(checkpoints, "write_manifest", read_only)
    with pytest.raises(SystemExit):
        train_script.main(_flags(assets, tmp_path / "ro"))
    err = capsys.readouterr().err
    assert "step-1.tmp/manifest.json" in err and "PermissionError" in err and "Permission denied" in err


# ----------------------------------------------------------------------------------------------------------------
# LoRA adapter folders
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def adapter(tmp_path) -> Path:
    from training.lora import add_lora

    add_lora(tiny_model(0), rank=2, init_lora_weights=False).save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def _nan_weights(folder: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(folder / "adapter_model.safetensors")
    name = sorted(tensors)[0]
    tensors[name][0] = float("nan")
    save_file(tensors, folder / "adapter_model.safetensors")


ADAPTER_CASES = {  # damage → (exception, what the message must say)
    "missing folder": (lambda f: f.rename(f.with_name("gone")), FileNotFoundError,
                       r"LoRA adapter folder .*adapter not found"),
    "no config": (lambda f: (f / "adapter_config.json").unlink(), FileNotFoundError,
                  r"adapter has no adapter_config\.json"),
    "non-JSON config": (lambda f: (f / "adapter_config.json").write_text("{r: 4"), ValueError,
                        r"adapter_config\.json is not valid JSON"),
    "config not a LoRA config": (lambda f: (f / "adapter_config.json").write_text("[1]"), ValueError,
                                 r"adapter_config\.json is not a PEFT LoRA config"),
    "no weights": (lambda f: (f / "adapter_model.safetensors").unlink(), FileNotFoundError,
                   r"has no adapter_model\.safetensors \(it is missing\)"),
    "pickled weights": (lambda f: (f / "adapter_model.safetensors").rename(f / "adapter_model.bin"), FileNotFoundError,
                        r"adapter_model\.bin is a pickle and is never loaded"),
    "empty weights": (lambda f: (f / "adapter_model.safetensors").write_bytes(b""), ValueError,
                      r"adapter_model\.safetensors is not a readable safetensors file"),
    "truncated weights": (lambda f: (f / "adapter_model.safetensors").write_bytes(
                              (f / "adapter_model.safetensors").read_bytes()[:-100]),
                          ValueError, r"adapter_model\.safetensors is not a readable safetensors file"),
    "no tensors": (lambda f: save_file({}, f / "adapter_model.safetensors"), ValueError,
                   r"adapter_model\.safetensors holds no tensors"),
    "NaN weights": (_nan_weights, ValueError,
                    r"adapter_model\.safetensors: tensor .*lora_.* holds NaN or infinite values"),
}  # fmt: skip


@pytest.mark.parametrize("damage", list(ADAPTER_CASES))
def test_a_bad_adapter_folder_is_named_before_anything_loads(damage, adapter):
    from modeling_transfusion.lora_transfusion import check_adapter

    assert check_adapter(adapter) == adapter  # a freshly saved adapter passes
    spoil, error, message = ADAPTER_CASES[damage]
    spoil(adapter)
    with pytest.raises(error, match=message):
        check_adapter(adapter)


@pytest.mark.parametrize("damage", list(ADAPTER_CASES))
def test_the_pipeline_refuses_a_bad_adapter_folder_by_name(damage, adapter, tokenizer):
    from conftest import tiny_model
    from diffusers import DDIMScheduler

    from modeling_transfusion import TransfusionPipeline

    model = tiny_model()
    pipe = TransfusionPipeline(model, DDIMScheduler.from_config(model.config.scheduler_config()), tokenizer)
    spoil, error, message = ADAPTER_CASES[damage]
    spoil(adapter)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        pipe.load_lora_weights(adapter)
    assert not getattr(model, "_hf_peft_config_loaded", False)  # nothing was loaded
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_evaluate_concept_checks_the_adapter_before_scoring_the_base(adapter, tmp_path, monkeypatch):
    from experiments import lora_concept

    monkeypatch.setattr(lora_concept, "load_base", lambda path: pytest.fail("the base model was loaded first"))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(str(adapter / "adapter_model.safetensors"))):
        lora_concept.main(["evaluate", "--adapter", str(adapter), "--base", str(tmp_path)])


# ----------------------------------------------------------------------------------------------------------------
# Converters
# ----------------------------------------------------------------------------------------------------------------


def test_llama_converter_names_a_missing_source_or_vae_folder(tmp_path):
    from conversion import convert_llama_to_transfusion as llama_conv

    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError,
                       match=rf"--source {re.escape(str(missing))}: no such folder \(expected a local"):
        llama_conv.main(["--source", str(missing), "--output", str(tmp_path / "out")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"--source .*empty: config\.json is missing"):
        llama_conv.convert(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"--vae .*no-vae: no such folder \(expected a diffusers AutoencoderKL"):
        llama_conv.load_vae(tmp_path / "no-vae")


def test_transfusion_pytorch_converter_names_bad_weight_and_option_files(tmp_path):
    from conversion.convert_transfusion_pytorch import convert, load_state

    with pytest.raises(FileNotFoundError, match=r"--weights .*missing\.safetensors: no such file"):
        load_state(tmp_path / "missing.safetensors")
    good = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(4, 4)}, good)
    (tmp_path / "truncated.safetensors").write_bytes(good.read_bytes()[:-10])
    (tmp_path / "empty.safetensors").write_bytes(b"")
    for name in ("truncated.safetensors", "empty.safetensors"):
        with pytest.raises(ValueError, match=rf"{name} is not a readable safetensors file"):
            load_state(tmp_path / name)
    save_file({"w": torch.tensor([1.0, float("nan")])}, tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match=r"nan\.safetensors: tensor w holds NaN or infinite values"):
        load_state(tmp_path / "nan.safetensors")
    (tmp_path / "options.json").write_text("{dim: 32")
    with pytest.raises(ValueError, match=r"--config .*options\.json: not a readable JSON file"):
        convert(good, tmp_path / "options.json")
    (tmp_path / "options.json").write_text(json.dumps([1]))
    with pytest.raises(ValueError, match=r"--config .*options\.json: expected a JSON object"):
        convert(good, tmp_path / "options.json")
