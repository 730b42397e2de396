"""Working with the modality experts of a Mixture-of-Transformers Transfusion (`config.modality_experts == "mot"`).

LMFusion (arXiv 2412.15188) turns a pretrained language model into a Transfusion: its weights become the text experts
and stay frozen, the image experts start as copies of them (the paper's initialisation: "initialised from the
pretrained text modules") and train together with the patch layers.

    init_image_experts_from_text(model)   # image experts ← copies of the text weights
    freeze_text(model)                    # text experts, token embedding, LM head: no gradient
"""

import torch

from .modeling_transfusion import TransfusionPreTrainedModel


def _text_name(image_name: str) -> str | None:
    """The text weight an image-expert weight mirrors (None for a weight that is no image expert)."""
    for image, text in ((".image_self_attn.", ".self_attn."), (".image_mlp.", ".mlp."),
                        (".image_input_layernorm.", ".input_layernorm."),
                        (".image_post_attention_layernorm.", ".post_attention_layernorm."),
                        (".image_norm.", ".norm.")):  # fmt: skip
        if image in f".{image_name}":
            return f".{image_name}".replace(image, text, 1)[1:]
    return None


def image_expert_pairs(model: TransfusionPreTrainedModel) -> dict[str, str]:
    """{image-expert parameter name: the text parameter it mirrors}; empty for a dense model."""
    names = {name for name, _ in model.named_parameters()}
    pairs = {name: _text_name(name) for name in names if _text_name(name) is not None}
    missing = sorted(t for t in pairs.values() if t not in names)
    if missing:
        raise ValueError(f"image experts without their text weights: {missing[:4]}")
    return pairs


def init_image_experts_from_text(model: TransfusionPreTrainedModel) -> int:
    """Copy every text weight into the image expert that mirrors it (LMFusion's initialisation); returns how many."""
    pairs = image_expert_pairs(model)
    if not pairs:
        raise ValueError("this model has no image experts: build it with TransfusionConfig(modality_experts='mot')")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for image, text in pairs.items():
            params[image].copy_(params[text])
    return len(pairs)


def text_parameter_names(model: TransfusionPreTrainedModel) -> list[str]:
    """The text side of a MoT model: the token embedding, the LM head, and every decoder weight that is not an image
    expert, the final norm included (the patch layers, timestep embedder and VAE are image side)."""
    if not image_expert_pairs(model):
        raise ValueError("freezing the text side needs image experts: build the model with modality_experts='mot'")
    image_side = ("patch_encoder.", "patch_decoder.", "time_embed.", "vae.")
    return [
        name
        for name, _ in model.named_parameters()
        if _text_name(name) is None and not name.removeprefix("model.").startswith(image_side)
    ]


def freeze_text(model: TransfusionPreTrainedModel) -> list[str]:
    """Stop gradients to the text side (`text_parameter_names`); returns the frozen names. An optimizer built from
    the trainable parameters afterwards never touches them, so text-only outputs stay bit for bit the same."""
    names = text_parameter_names(model)
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(False)
    return names


__all__ = ["image_expert_pairs", "init_image_experts_from_text", "text_parameter_names", "freeze_text"]
