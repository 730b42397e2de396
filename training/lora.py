"""LoRA adapters on a Transfusion model for training (PEFT): which layers an adapter may target and how it is added.
Used by `training.train --lora-rank` and the LoRA script; loading adapters for inference is the pipeline's and the
model's (`modeling_transfusion/lora_transfusion.py`)."""

import re

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# trained in full (not LoRA) with train_patch_modules: everything on the image path outside the backbone but the VAE
PATCH_MODULES = ("patch_encoder", "patch_decoder", "time_embed")


def check_target_modules(model, targets) -> list[str]:
    """The LoRA targets, validated: each must name a Linear/Conv/Embedding layer of the model outside the VAE."""
    from torch import nn

    targets = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
    if not targets:
        raise ValueError("no LoRA target modules given")
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)) and ".vae." not in f".{name}."
    ]
    layers = {name.rsplit(".", 1)[-1] for name in names}
    # PEFT matches a target by name suffix: "q_proj" (every expert), "self_attn.q_proj" (text), "image_self_attn.q_proj"
    unknown = [t for t in targets if not any(name == t or name.endswith("." + t) for name in names)]
    if unknown:
        raise ValueError(
            f"Unknown LoRA target module(s) {unknown}: this model's adaptable layers (VAE excluded) are named "
            f"{sorted(layers)}"
        )
    return targets


def add_lora(model, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0, targets=DEFAULT_TARGETS,
             train_patch_modules: bool = False, init_lora_weights=True):  # fmt: skip
    """Wrap `model` in a PEFT LoRA model on `targets` (names checked first); returns the `PeftModel`."""
    from peft import LoraConfig, get_peft_model

    targets = check_target_modules(model, targets)
    if rank < 1:
        raise ValueError(f"rank={rank} must be ≥ 1")
    vae_names = {name.rsplit(".", 1)[-1] for name, _ in model.model.vae.named_modules()}
    if vae_names & set(targets):  # a name the frozen VAE shares: match it everywhere but inside the VAE
        targets = rf"^(?!model\.vae\.).*\.({'|'.join(map(re.escape, targets))})$"
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        modules_to_save=list(PATCH_MODULES) if train_patch_modules else None,
        init_lora_weights=init_lora_weights,
    )
    return get_peft_model(model, config)
