"""Converters: a tiny random Llama / Qwen2 becomes a Transfusion model with the same text logits; transfusion-pytorch
tensors land where the mapping says (and its mapped blocks compute the same); the Hub export; clear errors."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import outside_repo_env, tiny_model
from diffusers import AutoencoderKL, DDIMScheduler
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
)

from conversion import convert_llama_to_transfusion as llama_conv
from conversion import convert_transfusion_pytorch as tp_conv
from conversion import export_pipeline
from modeling_transfusion import TransfusionForCausalLM
from modeling_transfusion.configuration_transfusion import TINY_VAE
from pipelines import TransfusionPipeline

torch.set_num_threads(1)
FIXTURES = Path(__file__).resolve().parents[1] / "conversion" / "fixtures"
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128)


@pytest.fixture(scope="module")
def source_tokenizer():
    """A Llama-style BPE tokenizer: <s> / </s> / <unk>, no pad and no image tokens."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)  # fmt: skip
    tok.train_from_iterator(["a red circle to the left of a blue square", "hello world, some text"] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def save_source(folder, model, tokenizer):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def assert_same_text_logits(source, converted, vocab):
    ids = torch.randint(0, vocab, (2, 14), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: positions must follow the mask in both
    with torch.no_grad():
        expected = source(input_ids=ids, attention_mask=mask).logits[..., :vocab]
        got = converted(input_ids=ids, attention_mask=mask).logits[..., :vocab]
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, 3:], expected[1, 3:], atol=1e-5, rtol=1e-5)


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}  # fmt: skip
YARN_ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_key_value_heads=2, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE),  # GQA, tied, llama3 RoPE
        dict(num_key_value_heads=4, tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
             rope_parameters=YARN_ROPE),  # MHA, untied, biases, yarn  # fmt: skip
    ],
    ids=["llama-gqa-tied-llama3rope", "llama-mha-untied-bias-yarn"],
)
def test_llama_converts_with_identical_text_logits(tmp_path, source_tokenizer, overrides, capsys):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(source_tokenizer), bos_token_id=1, eos_token_id=2, **SMALL, **overrides)
    source = LlamaForCausalLM(config).eval()
    folder = save_source(tmp_path / "llama", source, source_tokenizer)

    out = llama_conv.main(["--source", str(folder), "--output", str(tmp_path / "converted")])
    assert "wrote the model to" in capsys.readouterr().out
    model = TransfusionForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    c = model.config
    assert_same_text_logits(source, model, len(source_tokenizer))

    # vocabulary: image tokens and a pad token appended, ids in the config taken from the tokenizer
    assert c.vocab_size == len(tokenizer) == len(source_tokenizer) + 4
    assert [tokenizer.convert_ids_to_tokens(i) for i in (c.boi_token_id, c.eoi_token_id, c.image_token_id)] == [
        "<|boi|>", "<|eoi|>", "<|image|>"]  # fmt: skip
    assert tokenizer.pad_token == "<|pad|>" and c.pad_token_id == tokenizer.pad_token_id
    assert (c.bos_token_id, c.eos_token_id) == (1, 2)
    assert tokenizer("<|boi|>", add_special_tokens=False)["input_ids"] == [c.boi_token_id]
    assert c.tie_word_embeddings == config.tie_word_embeddings
    assert c.num_key_value_heads == config.num_key_value_heads and c.rope_parameters == config.rope_parameters
    new_rows = model.model.embed_tokens.weight[len(source_tokenizer) :]
    torch.testing.assert_close(new_rows, source.model.embed_tokens.weight.mean(0).expand_as(new_rows))
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["added_token_rows"] == list(range(len(source_tokenizer), len(source_tokenizer) + 4))


def test_qwen2_converts_with_q_k_v_biases(tmp_path, source_tokenizer):
    torch.manual_seed(0)
    # a padded vocabulary (as the real Qwen2 checkpoints have): the added tokens take unused rows
    config = Qwen2Config(vocab_size=len(source_tokenizer) + 8, num_key_value_heads=2, tie_word_embeddings=False,
                         **SMALL)
    source = Qwen2ForCausalLM(config).eval()
    folder = save_source(tmp_path / "qwen2", source, source_tokenizer)
    model, tokenizer, report = llama_conv.convert(folder)
    assert model.config.attention_bias and model.config.vocab_size == config.vocab_size
    assert report["zero_initialised"] == [f"model.layers.{i}.self_attn.o_proj.bias" for i in range(2)]
    assert not model.model.layers[0].self_attn.o_proj.bias.any()
    assert_same_text_logits(source, model, len(source_tokenizer))


def test_mistral_without_sliding_window_converts(tmp_path, source_tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(source_tokenizer), num_key_value_heads=2, sliding_window=None, **SMALL)
    source = MistralForCausalLM(config).eval()
    model, _, _ = llama_conv.convert(save_source(tmp_path / "mistral", source, source_tokenizer))
    assert_same_text_logits(source, model, len(source_tokenizer))
    with pytest.raises(ValueError, match="sliding-window attention"):
        llama_conv.check_source_config(MistralConfig(sliding_window=64, **SMALL))


def test_unsupported_sources_are_refused(tmp_path, source_tokenizer):
    qwen3 = Qwen3Config(vocab_size=len(source_tokenizer), num_key_value_heads=2, **SMALL)
    with pytest.raises(ValueError, match="q_norm/k_norm"):
        llama_conv.check_source_config(qwen3)
    gpt2_model = GPT2LMHeadModel(GPT2Config(vocab_size=len(source_tokenizer), n_embd=32, n_layer=1, n_head=2))
    gpt2 = save_source(tmp_path / "gpt2", gpt2_model, source_tokenizer)
    with pytest.raises(ValueError, match=r"'gpt2' is not a supported Llama-family model"):
        llama_conv.convert(gpt2)
    dynamic = LlamaConfig(**SMALL, rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0})
    with pytest.raises(ValueError, match="'dynamic' changes the rotary frequencies"):
        llama_conv.check_source_config(dynamic)


def test_mismatched_and_unknown_source_weights_are_named(source_tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(source_tokenizer), num_key_value_heads=2, **SMALL)
    state = LlamaForCausalLM(config).state_dict()
    special = {"boi": 120, "eoi": 121, "image": 122, "pad": 123, "bos": 1, "eos": 2}
    target_config = llama_conv.transfusion_config(config, special, len(source_tokenizer) + 4)
    bad = dict(state, **{"model.layers.1.mlp.up_proj.weight": torch.zeros(48, 32)})
    with pytest.raises(ValueError,
                       match=r"model.layers.1.mlp.up_proj.weight: source shape \[48, 32\] differs from.*\[64, 32\]"):
        llama_conv.map_text_weights(bad, TransfusionForCausalLM(target_config), 120, [120, 121, 122, 123])
    extra = dict(state, **{"model.layers.0.self_attn.q_norm.weight": torch.ones(8)})
    with pytest.raises(ValueError, match=r"no place for: \['model.layers.0.self_attn.q_norm.weight'\]"):
        llama_conv.map_text_weights(extra, TransfusionForCausalLM(target_config), 120, [120, 121, 122, 123])


def test_pipeline_output_with_a_vae(tmp_path, source_tokenizer):
    torch.manual_seed(0)
    source = LlamaForCausalLM(LlamaConfig(vocab_size=len(source_tokenizer), num_key_value_heads=2, **SMALL)).eval()
    folder = save_source(tmp_path / "llama", source, source_tokenizer)
    vae = AutoencoderKL.from_config(TINY_VAE)
    vae.save_pretrained(tmp_path / "vae")
    out = llama_conv.main(["--source", str(folder), "--output", str(tmp_path / "pipe"), "--vae", str(tmp_path / "vae"),
                           "--pipeline"])  # fmt: skip
    assert (out / "model_index.json").exists() and (out / "README.md").exists()
    pipe = TransfusionPipeline.from_pretrained(out)
    for name, value in vae.state_dict().items():
        torch.testing.assert_close(pipe.vae.state_dict()[name], value, rtol=0, atol=0)
    assert pipe.transformer.config.image_size == 32
    assert_same_text_logits(source, pipe.transformer, len(source_tokenizer))
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, guidance_scale=2.0, output_type="pt").images
    assert image.shape == (1, 3, 32, 32)


# -- transfusion-pytorch ----------------------------------------------------------------------------------------------
TP_WEIGHTS = FIXTURES / "transfusion_pytorch_tiny.safetensors"
TP_OPTIONS = FIXTURES / "transfusion_pytorch_tiny.json"
needs_fixture = pytest.mark.skipif(not TP_WEIGHTS.exists(), reason="transfusion-pytorch fixture not present")


@needs_fixture
def test_transfusion_pytorch_tensors_land_where_mapped(tmp_path, capsys):
    out = tp_conv.main(["--weights", str(TP_WEIGHTS), "--config", str(TP_OPTIONS), "--output", str(tmp_path / "tp")])
    assert "U-Net skip projection" in capsys.readouterr().out
    model = TransfusionForCausalLM.from_pretrained(out).eval()
    src = load_file(str(TP_WEIGHTS))
    c = model.config
    sizes = (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.head_dim, c.intermediate_size)
    assert sizes == (16, 2, 2, 8, 21)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id, c.boi_token_id, c.eoi_token_id) == (32, 33, 34, 35, 36)
    assert c.image_token_id == c.vocab_size - 1 == src["text_embed.weight"].shape[0]
    sd = model.state_dict()
    torch.testing.assert_close(sd["model.embed_tokens.weight"][:-1], src["text_embed.weight"])
    torch.testing.assert_close(sd["lm_head.weight"][:-1], src["to_text_logits.weight"])
    # q: head 1, rotate-half coordinate 5 (= pair 1, second half) is interleaved coordinate 3
    torch.testing.assert_close(sd["model.layers.1.self_attn.q_proj.weight"][8 + 5],
                               src["transformer.layers.1.1.fn.to_qk.0.weight"][8 + 3])
    torch.testing.assert_close(sd["model.layers.1.self_attn.k_proj.weight"][2],
                               src["transformer.layers.1.1.fn.to_qk.0.weight"][16 + 4])
    torch.testing.assert_close(sd["model.layers.0.self_attn.v_proj.weight"],
                               src["transformer.layers.0.1.fn.to_v.0.weight"])
    scale = src["transformer.layers.0.1.layerscale"] + 1
    torch.testing.assert_close(sd["model.layers.0.self_attn.o_proj.weight"],
                               scale[:, None] * src["transformer.layers.0.1.fn.to_out.1.weight"])
    torch.testing.assert_close(sd["model.layers.0.mlp.gate_proj.bias"],
                               src["transformer.layers.0.2.fn.net.0.bias"][21:])
    torch.testing.assert_close(sd["model.layers.0.input_layernorm.weight"],
                               src["transformer.layers.0.1.layernorm_gamma"] + 1)
    torch.testing.assert_close(sd["model.norm.weight"], src["transformer.norm.gamma"] + 1)
    torch.testing.assert_close(sd["model.patch_encoder.proj.weight"], src["latent_to_model_projs.0.weight"])
    torch.testing.assert_close(sd["model.patch_decoder.proj_out.weight"], -src["model_to_latent_projs.0.weight"])
    assert (c.diffusion_type, c.prediction_type, c.patch_size, c.patch_dim) == ("flow_matching", "flow", 1, 4)


@needs_fixture
def test_transfusion_pytorch_mapped_blocks_compute_the_same():
    """The fixture holds its first layer's attention (soft-cap off) and feed-forward outputs on a fixed input."""
    model, _ = tp_conv.convert(TP_WEIGHTS, TP_OPTIONS)
    ref = load_file(str(FIXTURES / "transfusion_pytorch_tiny_reference.safetensors"))
    u, layer = ref["input"], model.model.layers[0]
    position_embeddings = model.model.rotary_emb(u, torch.arange(5)[None])
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    with torch.no_grad():
        attention, _ = layer.self_attn(u, position_embeddings, causal)
        torch.testing.assert_close(attention, ref["attention"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(layer.mlp(u), ref["feed_forward"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(model.lm_head(u)[..., :-1], ref["logits"], atol=1e-6, rtol=1e-5)


def test_transfusion_pytorch_options_without_counterpart_are_refused(tmp_path):
    defaults = {"num_text_tokens": 32, "dim_latent": 4, "transformer": {"dim": 16, "depth": 2}}
    with pytest.raises(ValueError, match=r"qk_rmsnorm=True.*gate_values=True"):
        tp_conv.check_options(defaults)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['transformer.fancy'\]"):
        tp_conv.check_options({"num_text_tokens": 8,
                               "transformer": {"dim": 8, "depth": 1, "fancy": 1, "qk_rmsnorm": False,
                                               "attn_kwargs": {"gate_values": False}}})  # fmt: skip
    with pytest.raises(ValueError, match="use_value_residual=True: value residual"):
        tp_conv.check_options({**defaults, "transformer": {**defaults["transformer"], "qk_rmsnorm": False,
                                                           "use_value_residual": True,
                                                           "attn_kwargs": {"gate_values": False}}})  # fmt: skip
    with pytest.raises(ValueError, match="several modalities"):
        tp_conv.check_options({**defaults, "dim_latent": [4, 8],
                               "transformer": {"dim": 16, "depth": 2, "qk_rmsnorm": False,
                                               "attn_kwargs": {"gate_values": False}}})  # fmt: skip


@needs_fixture
def test_transfusion_pytorch_unexplained_tensors_and_shapes_are_errors(tmp_path):
    from safetensors.torch import save_file

    state = load_file(str(TP_WEIGHTS))
    gated = dict(state, **{"transformer.layers.0.1.fn.to_gates.0.weight": torch.zeros(2, 16)})
    save_file(gated, tmp_path / "gated.safetensors")
    with pytest.raises(ValueError, match=r"no counterpart.*to_gates"):
        tp_conv.convert(tmp_path / "gated.safetensors", TP_OPTIONS)
    options = json.loads(TP_OPTIONS.read_text())
    options["transformer"]["heads"] = 4  # the tensors were made with 2 heads of 8
    with pytest.raises(ValueError, match=r"to_qk.0.weight: shape \[32, 16\] differs from \[64, 16\]"):
        tp_conv.convert(TP_WEIGHTS, options)


# -- export ---------------------------------------------------------------------------------------------------------
def test_export_pipeline_with_card_lora_and_scheduler(tmp_path, tokenizer, monkeypatch, capsys):
    from training.lora import add_lora

    model = tiny_model(0)
    base = TransfusionPipeline(transformer=model, scheduler=DDIMScheduler.from_config(model.config.scheduler_config()),
                               tokenizer=tokenizer)  # fmt: skip
    base.save_pretrained(tmp_path / "base")
    adapter = add_lora(tiny_model(0), rank=4, init_lora_weights=False).eval()
    adapter.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(6, 300, (1, 9))
    with torch.no_grad():
        expected = adapter(input_ids=ids).logits

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create", repo_id, kwargs["private"]))

        def upload_folder(self, folder_path, repo_id, **kwargs):
            calls.append(("upload", Path(folder_path).name, repo_id))
            return "commit-url"

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    out = export_pipeline.main(["--model", str(tmp_path / "base"), "--output", str(tmp_path / "export"),
                                "--lora", str(tmp_path / "adapter"), "--scheduler", "dpm",
                                "--scheduler-config", '{"algorithm_type": "sde-dpmsolver++"}',
                                "--description", "A tiny test model.",
                                "--push-to-hub", "someone/tiny", "--private"])  # fmt: skip
    assert "pushed" in capsys.readouterr().out
    assert calls == [("token", None), ("create", "someone/tiny", True), ("upload", "export", "someone/tiny")]
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: diffusers" in card and "pipeline_tag: text-to-image" in card
    assert 'DiffusionPipeline.from_pretrained("someone/tiny", trust_remote_code=True)' in card
    assert "A tiny test model." in card
    saved = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (saved["_class_name"], saved["algorithm_type"]) == ("DPMSolverMultistepScheduler", "sde-dpmsolver++")
    assert "`DPMSolverMultistepScheduler (sde-dpmsolver++)`" in card
    pipe = TransfusionPipeline.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(input_ids=ids).logits, expected, atol=2e-5, rtol=1e-5)  # LoRA fused

    with pytest.raises(SystemExit):
        export_pipeline.main(["--model", str(out), "--output", str(out)])
    with pytest.raises(ValueError, match=r"overrides \['algorithm'\] are not in DDIMScheduler's config"):
        export_pipeline.main(["--model", str(out), "--output", str(tmp_path / "x"), "--scheduler", "ddim",
                              "--scheduler-config", '{"algorithm": "sde"}'])  # fmt: skip
    other = AutoencoderKL.from_config({**TINY_VAE, "block_out_channels": [32, 32, 64]})
    other.save_pretrained(tmp_path / "other-vae")
    with pytest.raises(ValueError, match=r"block_out_channels: model \[32, 64, 64\] vs VAE \[32, 32, 64\]"):
        export_pipeline.replace_vae(pipe.transformer, tmp_path / "other-vae")


def test_exported_folder_loads_as_remote_code_in_a_fresh_process(tmp_path, tokenizer):
    model = tiny_model(0)
    export_pipeline.save_pipeline(model, tokenizer, tmp_path / "export")
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([[7, 8, 9]])).logits
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoProcessor
        torch.set_num_threads(1)
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "export")!r}, subfolder="transformer",
                                                     trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        got = model(input_ids=torch.tensor([[7, 8, 9]])).logits
        processor = AutoProcessor.from_pretrained({str(tmp_path / "export")!r}, subfolder="transformer",
                                                  trust_remote_code=True)
        assert processor(["a red circle"])["input_ids"].shape[0] == 1
        torch.testing.assert_close(got, torch.load({str(tmp_path / "expected.pt")!r}))
        print("ok")
    """)
    env = outside_repo_env(tmp_path, {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf")})
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env=env)  # fmt: skip
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_a_pt_file_with_objects_is_refused_without_advising_weights_only_false(tmp_path):
    from conversion.convert_transfusion_pytorch import load_state

    import datetime

    # any object outside torch's tensor allow-list makes the file more than tensors
    torch.save({"model": {"w": torch.zeros(2)}, "extra": datetime.date(2024, 1, 1)}, tmp_path / "objects.pt")
    (tmp_path / "garbage.pt").write_bytes(b"garbage")
    for name in ("objects.pt", "garbage.pt"):
        with pytest.raises(ValueError, match=r"is not loaded: a \.pt file may only hold a state dict") as info:
            load_state(tmp_path / name)
        assert "weights_only=False" not in str(info.value) and info.value.__cause__ is None
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "ok.pt")
    assert torch.equal(load_state(tmp_path / "ok.pt")["w"], torch.ones(2))


def test_llama_converts_to_mot_with_identical_text_logits_and_copied_image_experts(tmp_path, source_tokenizer):
    from modeling_transfusion import TransfusionPipeline
    from modeling_transfusion.experts_transfusion import image_expert_pairs

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(source_tokenizer), bos_token_id=1, eos_token_id=2, **SMALL)
    source = LlamaForCausalLM(config).eval()
    folder = save_source(tmp_path / "llama", source, source_tokenizer)
    out = llama_conv.main(["--source", str(folder), "--output", str(tmp_path / "mot"), "--modality-experts", "mot",
                           "--pipeline"])
    pipe = TransfusionPipeline.from_pretrained(out)  # the output folder loads with the pipeline
    model = pipe.transformer.eval()
    assert model.config.modality_experts == "mot"
    assert_same_text_logits(source, model, len(source_tokenizer))  # text experts = the source, exactly
    state = model.state_dict()
    pairs = image_expert_pairs(model)
    assert len(pairs) == 9 * config.num_hidden_layers + 1  # q k v o, gate up down, two norms per layer; the final norm
    for image, text in pairs.items():
        assert torch.equal(state[image], state[text]), image  # LMFusion: image experts start as the text weights
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["image_experts_copied_from_text"] == len(pairs)
    assert pipe("a photo", num_inference_steps=2, output_type="latent").images.shape == (1, 4, 8, 8)
