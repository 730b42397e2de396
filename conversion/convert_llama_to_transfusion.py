"""Initialise the text part of a Transfusion model from a transformers Llama-family causal LM.

    python -m conversion.convert_llama_to_transfusion --source path/to/SmolLM2-135M --output runs/smollm-transfusion
    python -m conversion.convert_llama_to_transfusion --source path/to/Qwen2.5-0.5B --output runs/qwen-tf \\
        --vae checkpoints/vae --pipeline       # a full pipeline folder with that VAE

Supported sources (`config.model_type`): `llama` (Llama 1–3, SmolLM, TinyLlama, …), `mistral` (without sliding-window
attention) and `qwen2` (q/k/v biases; the o_proj bias Transfusion's `attention_bias` adds is set to zero). Qwen3 and
others are refused with the reason. The backbone keeps Llama's module names, so the weights map one to one:

    model.embed_tokens.weight                    → model.embed_tokens.weight   (rows for the added tokens appended)
    model.layers.i.self_attn.{q,k,v,o}_proj.*    → same name                   (GQA kept: num_key_value_heads)
    model.layers.i.mlp.{gate,up,down}_proj.*     → same name
    model.layers.i.{input,post_attention}_layernorm.weight, model.norm.weight → same name
    lm_head.weight                               → lm_head.weight              (absent when the embeddings are tied)

RoPE settings are carried over (`rope_parameters`: theta and the static scaled variants `linear`, `llama3`, `yarn`;
`dynamic` and `longrope` change with the sequence length at run time and are refused). The tokenizer gains
`<|boi|> <|eoi|> <|image|>` (and `<|pad|>` if it has no pad token); their embedding and output rows start at the mean of
the source rows, and the config's special ids come from the tokenizer. Everything on the image path (patch
encoder/decoder, timestep embedder, VAE unless `--vae` is given) is freshly initialised. On text the converted model
computes the source's logits exactly (over the source vocabulary).
"""

import argparse
import json
from pathlib import Path

import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
IMAGE_TOKENS = {"boi": "<|boi|>", "eoi": "<|eoi|>", "image": "<|image|>"}
PAD_TOKEN = "<|pad|>"
# image-path settings when no --vae is given: the tiny preset's (32×32 RGB → 8×8×4 latents, 2×2 patches)
DEFAULT_IMAGE = {"latent_size": 8, "patch_size": 2, "patch_encoder": "linear"}
IMAGE_PREFIXES = ("model.patch_encoder.", "model.patch_decoder.", "model.time_embed.", "model.vae.")


def check_source_config(config) -> None:
    """Raise ValueError unless `config` is a Llama-family config whose computation Transfusion reproduces exactly."""
    kind = getattr(config, "model_type", type(config).__name__)
    if kind == "qwen3":
        raise ValueError(
            "Qwen3 normalises queries and keys per head (q_norm/k_norm) before RoPE; Transfusion's attention has no "
            f"such norms, so the conversion would not be exact. Supported model types: {SUPPORTED_MODEL_TYPES}"
        )
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"Source model_type {kind!r} is not a supported Llama-family model; supported: {SUPPORTED_MODEL_TYPES}"
        )
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise ValueError(
            f"rope_type {rope_type!r} changes the rotary frequencies with the sequence length at run time; Transfusion "
            f"computes them once. Supported rope types: {STATIC_ROPE_TYPES}"
        )
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):
        raise ValueError(f"partial_rotary_factor={partial}: Transfusion rotates the whole head dimension (factor 1.0)")
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", kind == "mistral")
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if (window is not None and uses_window and window < config.max_position_embeddings) or layer_types != {
        "full_attention"
    }:
        raise ValueError(
            f"The source uses sliding-window attention (sliding_window={window}, layer_types={sorted(layer_types)}); "
            "Transfusion attends to the full sequence"
        )


def extend_tokenizer(tokenizer) -> dict[str, int]:
    """Add the image tokens (and a pad token if missing) to `tokenizer` in place; return the special ids."""
    from tokenizers import AddedToken

    missing = [t for t in IMAGE_TOKENS.values() if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in IMAGE_TOKENS.items()}
    ids["pad"] = tokenizer.pad_token_id
    return ids


def transfusion_config(source_config, tokenizer_ids: dict, vocab_size: int, vae_config: dict | None = None,
                       image_size: int | None = None, **image_overrides):  # fmt: skip
    """The TransfusionConfig of the converted model: the source's text settings, image settings from the VAE (or the
    tiny preset), special ids from the extended tokenizer."""
    from modeling_transfusion import TransfusionConfig
    from modeling_transfusion.configuration_transfusion import TINY_VAE

    s = source_config
    kind = s.model_type
    heads = s.num_attention_heads
    eos = s.eos_token_id if s.eos_token_id is not None else tokenizer_ids.get("eos")
    bos = tokenizer_ids.get("bos")
    if bos is None:
        bos = s.bos_token_id if s.bos_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    vae_config = dict(vae_config or TINY_VAE)
    downsample = 2 ** (len(vae_config.get("block_out_channels", [0])) - 1)
    image = {**DEFAULT_IMAGE, **{k: v for k, v in image_overrides.items() if v is not None}}
    if image_size is None and isinstance(vae_config.get("sample_size"), int):
        image_size = vae_config["sample_size"]  # the VAE's own resolution
    if image_size is not None:
        if image_size % downsample:
            raise ValueError(
                f"image_size={image_size} must be a multiple of the VAE's downsampling factor {downsample}"
            )
        image["latent_size"] = image_size // downsample
    return TransfusionConfig(
        vocab_size=vocab_size,
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=getattr(s, "num_key_value_heads", None) or heads,
        head_dim=getattr(s, "head_dim", None) or s.hidden_size // heads,
        hidden_act=s.hidden_act,
        max_position_embeddings=s.max_position_embeddings,
        rms_norm_eps=s.rms_norm_eps,
        initializer_range=getattr(s, "initializer_range", 0.02),
        rope_parameters=dict(s.rope_parameters),
        attention_bias=True if kind == "qwen2" else bool(getattr(s, "attention_bias", False)),
        mlp_bias=bool(getattr(s, "mlp_bias", False)),
        tie_word_embeddings=bool(getattr(s, "tie_word_embeddings", False)),
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=tokenizer_ids["pad"],
        boi_token_id=tokenizer_ids["boi"],
        eoi_token_id=tokenizer_ids["eoi"],
        image_token_id=tokenizer_ids["image"],
        latent_channels=vae_config.get("latent_channels", 4),
        vae_config=vae_config,
        **image,
    )


def map_text_weights(source_state: dict, model, source_vocab: int, new_rows: list[int]) -> dict:
    """Copy the source's text weights into `model` (same names); returns a report. Added-token rows of the embedding
    and output layers start at the mean of the source rows; a missing o_proj bias (Qwen2) is zero."""
    target = model.state_dict()
    from modeling_transfusion.experts_transfusion import image_expert_pairs

    experts = image_expert_pairs(model)  # MoT: filled from the text weights afterwards (LMFusion's initialisation)
    text_keys = [k for k in target if not k.startswith(IMAGE_PREFIXES) and k not in experts]
    tied = model.config.tie_word_embeddings
    if tied:
        text_keys = [k for k in text_keys if k != "lm_head.weight"]
    source_state = {k: v for k, v in source_state.items() if not k.endswith("rotary_emb.inv_freq")}
    if tied:
        source_state.pop("lm_head.weight", None)
    unknown = sorted(set(source_state) - set(text_keys))
    if unknown:
        raise ValueError(
            f"The source has weights Transfusion has no place for: {unknown[:6]}"
            + (f" … ({len(unknown)} in all)" if len(unknown) > 6 else "")
        )
    filled, zeroed = {}, []
    for key in text_keys:
        if key not in source_state:
            if key.endswith("o_proj.bias"):  # Qwen2 biases q, k, v but not o
                filled[key] = torch.zeros_like(target[key])
                zeroed.append(key)
                continue
            raise ValueError(
                f"The source has no weight {key} (shape {list(target[key].shape)}), which Transfusion needs"
            )
        value = source_state[key]
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            if value.shape[1] != target[key].shape[1] or value.shape[0] > target[key].shape[0]:
                raise ValueError(f"{key}: source shape {list(value.shape)} does not fit {list(target[key].shape)}")
            rows = target[key].clone()
            rows[: value.shape[0]] = value
            mean = value[:source_vocab].float().mean(0).to(value.dtype)
            for row in new_rows:
                rows[row] = mean
            value = rows
        elif value.shape != target[key].shape:
            raise ValueError(
                f"{key}: source shape {list(value.shape)} differs from Transfusion's {list(target[key].shape)}"
            )
        filled[key] = value.to(target[key].dtype)
    missing, unexpected = model.load_state_dict(filled, strict=False)
    assert not unexpected, unexpected
    if tied:
        model.tie_weights()
    report = {"copied": len(filled) - len(zeroed), "zero_initialised": zeroed, "added_token_rows": new_rows}
    if experts:
        from modeling_transfusion.experts_transfusion import init_image_experts_from_text

        report["image_experts_copied_from_text"] = init_image_experts_from_text(model)
    return report


def check_folder(path: str | Path, flag: str, what: str) -> Path:
    """A local model folder with its config.json; otherwise FileNotFoundError naming the folder (transformers and
    diffusers would take a missing folder for a Hub repo id and answer "Repo id must be in the form …")."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{flag} {folder}: no such folder (expected {what})")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{flag} {folder}: config.json is missing (expected {what})")
    return folder


def load_vae(path: str | Path):
    from diffusers import AutoencoderKL

    check_folder(path, "--vae", "a diffusers AutoencoderKL folder")
    vae = AutoencoderKL.from_pretrained(path)
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    config = json.loads(json.dumps(config))  # tuples → lists, as the config field stores them
    return vae, config


def convert(source: str | Path, vae: str | Path | None = None, image_size: int | None = None,
            patch_size: int | None = None, patch_encoder: str | None = None, dtype: str = "float32",
            modality_experts: str = "shared"):  # fmt: skip
    """Source causal-LM folder → (TransfusionForCausalLM, extended tokenizer, report)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from modeling_transfusion import TransfusionForCausalLM

    check_folder(source, "--source", "a local transformers causal-LM folder: config.json, weights and tokenizer files")
    source_config = AutoConfig.from_pretrained(source)
    check_source_config(source_config)
    tokenizer = AutoTokenizer.from_pretrained(source)
    original_length = len(tokenizer)
    special = extend_tokenizer(tokenizer)
    special["bos"], special["eos"] = tokenizer.bos_token_id, tokenizer.eos_token_id
    new_rows = sorted(i for i in range(original_length, len(tokenizer)))
    vocab_size = max(source_config.vocab_size, len(tokenizer))

    vae_model, vae_config = load_vae(vae) if vae is not None else (None, None)
    config = transfusion_config(source_config, special, vocab_size, vae_config, image_size,
                                patch_size=patch_size, patch_encoder=patch_encoder,
                                modality_experts=modality_experts)  # fmt: skip
    model = TransfusionForCausalLM(config)
    source_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    report = map_text_weights(
        source_model.state_dict(), model, min(original_length, source_config.vocab_size), new_rows
    )
    del source_model
    if vae_model is not None:
        model.model.vae.load_state_dict(vae_model.state_dict())
    model = model.to(getattr(torch, dtype)).eval()
    report.update(source=str(source), model_type=source_config.model_type, vocab_size=vocab_size,
                  source_vocab_size=source_config.vocab_size, special_ids=special,
                  vae=str(vae) if vae else None)  # fmt: skip
    return model, tokenizer, report


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m conversion.convert_llama_to_transfusion",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--source", required=True, help="folder of a transformers Llama/Mistral/Qwen2 causal LM + tokenizer")
    p.add_argument("--output", required=True, help="folder to write")
    p.add_argument("--vae", help="diffusers AutoencoderKL folder for the image path (default: a fresh tiny VAE)")
    p.add_argument("--image-size", type=int, help="pixel size of images (default: the VAE's sample_size, 32)")
    p.add_argument("--patch-size", type=int, help="latent patch size (default: 2)")
    p.add_argument("--patch-encoder", choices=("linear", "unet"), help="patch encoder/decoder (default: linear)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--modality-experts", default="shared", choices=("shared", "mot"),
                   help="mot: image experts beside the text weights (Mixture-of-Transformers), initialised as "
                   "copies of them as LMFusion does; train them with training.train --freeze-text")  # fmt: skip
    p.add_argument("--pipeline", action="store_true",
                   help="write a full TransfusionPipeline folder (model, VAE, scheduler, tokenizer, card, "
                   "remote code)")  # fmt: skip
    args = p.parse_args(argv)

    model, tokenizer, report = convert(args.source, args.vae, args.image_size, args.patch_size, args.patch_encoder,
                                       args.dtype, args.modality_experts)  # fmt: skip
    out = Path(args.output)
    if args.pipeline:
        from conversion.export_pipeline import save_pipeline

        save_pipeline(model, tokenizer, out, base_model=str(args.source))
    else:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    (out / "conversion_report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(
        f"converted {report['model_type']} ({report['copied']} tensors copied, vocabulary {report['source_vocab_size']}"
        f" → {report['vocab_size']}, special ids {report['special_ids']})"
        f" and wrote {'a pipeline' if args.pipeline else 'the model'} to {out}/"
    )
    return out


if __name__ == "__main__":
    main()
