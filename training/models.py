"""The model a training run starts from: built from the command line's flags and a tokenizer and VAE on disk, copied
from saved weights (`--init-from`), or a saved model as it is (`--base`)."""

import math
import os
from pathlib import Path

import torch

from training.arguments import MODEL_FLAGS


def load_base(path: str | os.PathLike):
    """A Transfusion model and its tokenizer from a pipeline folder (`transformer/` + `tokenizer/`) or a model folder
    (config, weights and tokenizer files side by side)."""
    from transformers import AutoTokenizer

    import modeling_transfusion  # noqa: F401  (registers the Auto classes)
    from modeling_transfusion import TransfusionForCausalLM

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"base checkpoint {root} not found (a saved TransfusionPipeline or model folder)")
    model_dir = root / "transformer" if (root / "model_index.json").exists() else root
    tokenizer_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else model_dir
    model = TransfusionForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return model, tokenizer


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    if not (Path(path) / "tokenizer.json").exists():
        raise FileNotFoundError(
            f"no tokenizer at {path}: build one with `python -m training.train_tokenizer` or pass --tokenizer"
        )
    return AutoTokenizer.from_pretrained(path)


def vae_config_from(path: str) -> dict:
    from diffusers import AutoencoderKL

    if not (Path(path) / "config.json").exists():
        raise FileNotFoundError(f"no VAE at {path}: train one with `python -m training.train_vae` or pass --vae")
    return {k: v for k, v in dict(AutoencoderKL.load_config(path)).items() if not k.startswith("_")}


def build_config(args, tokenizer, vae_config: dict):
    from modeling_transfusion import TransfusionConfig

    overrides = {field: getattr(args, flag) for flag, field in MODEL_FLAGS.items() if getattr(args, flag) is not None}
    if args.hidden_size is not None and args.intermediate_size is None:
        overrides["intermediate_size"] = 256 * math.ceil(args.hidden_size * 8 / 3 / 256)
    if args.noise_limit is not None:
        overrides["noise_limit_timestep"] = args.noise_limit or None
    downsample = 2 ** (len(vae_config["block_out_channels"]) - 1)
    overrides.update(
        vocab_size=len(tokenizer),
        vae_config=vae_config,
        latent_channels=vae_config["latent_channels"],
        latent_size=vae_config["sample_size"] // downsample,
    )
    overrides.update(args.model_kwargs or {})
    config = TransfusionConfig.from_preset(args.preset, **overrides)
    config._attn_implementation = args.attn_implementation
    if config.image_size != 32:
        raise ValueError(f"the VAE takes {config.image_size}×{config.image_size} images; the data world is 32×32")
    for name, token in (("bos", "<|bos|>"), ("eos", "<|eos|>"), ("pad", "<|pad|>"), ("boi", "<|boi|>"),
                        ("eoi", "<|eoi|>"), ("image", "<|image|>")):
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid != getattr(config, f"{name}_token_id"):
            raise ValueError(f"tokenizer id of {token} is {tid}, "
                             f"config.{name}_token_id is {getattr(config, f'{name}_token_id')}; "
                             "build the tokenizer with build_tokenizer()")
    return config


def build_model(config, vae_path: str, seed: int):
    from diffusers import AutoencoderKL

    from modeling_transfusion import TransfusionForCausalLM

    torch.manual_seed(seed)
    model = TransfusionForCausalLM(config)
    model.model.vae.load_state_dict(AutoencoderKL.from_pretrained(vae_path).state_dict())
    model.model.vae.requires_grad_(False)
    return model


def load_initial_weights(model, path: str) -> None:
    """Copy the weights of a saved Transfusion (a model folder, or a pipeline folder's `transformer/`) into `model`."""
    from modeling_transfusion import TransfusionForCausalLM

    folder = Path(path)
    folder = folder / "transformer" if (folder / "model_index.json").exists() else folder
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"--init-from {path}: no Transfusion model there (config.json missing in {folder})")
    from modeling_transfusion.experts_transfusion import image_expert_pairs, init_image_experts_from_text

    source = TransfusionForCausalLM.from_pretrained(folder)
    state = source.state_dict()
    experts = image_expert_pairs(model)
    try:
        if experts and not any(name in state for name in experts):
            # a dense model into a MoT one (LMFusion): its weights become the text experts, and the image experts
            # start as copies of them
            missing, unexpected = model.load_state_dict(state, strict=False)
            if unexpected or set(missing) - set(experts):
                raise RuntimeError(
                    f"Error(s):\n\tmissing {sorted(set(missing) - set(experts))[:4]}, "
                    f"unexpected {sorted(unexpected)[:4]}"
                )
            init_image_experts_from_text(model)
        else:
            model.load_state_dict(state)
    except RuntimeError as err:
        detail = str(err).split("\n\t")[1] if "\n\t" in str(err) else str(err)
        raise ValueError(f"--init-from {path}: its weights do not fit the model these flags build ({detail}); give "
                         "the same model flags as the run that made them (e.g. its --config)") from None
