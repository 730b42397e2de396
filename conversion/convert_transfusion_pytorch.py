"""Import a `transfusion-pytorch` (lucidrains, PyPI, version 0.20.0) state dict where its modules correspond to ours.

    python -m conversion.convert_transfusion_pytorch --weights model.safetensors --config kwargs.json --output runs/tp

`--weights` is the `state_dict()` of a `transfusion_pytorch.Transfusion` (safetensors, or a torch `.pt`/`.bin` file read
with `weights_only=True`); `--config` is a JSON file with the keyword arguments it was built with. Save both on the
training side with `safetensors.torch.save_file(model.state_dict(), ...)` and `json.dump(kwargs, ...)`.

What maps (exact tensor copies, or exact re-arrangements):

    text_embed / to_text_logits          → model.embed_tokens / lm_head (one row appended for <|image|>)
    layers.i.1.fn.to_qk, to_v            → q_proj, k_proj (rows permuted: interleaved RoPE pairs → rotate-half), v_proj
    layers.i.1.fn.to_out.1 · (1+layerscale)  → o_proj      (the text path's layer scale folded in)
    layers.i.2.fn.net.0 (GEGLU: x | gate) → up_proj | gate_proj (+ biases), hidden_act "gelu"
    layers.i.2.fn.net.3 · (1+layerscale) → down_proj (+ bias)
    layers.i.{1,2}.layernorm_gamma + 1   → input_layernorm / post_attention_layernorm weights
    transformer.norm.gamma + 1           → model.norm.weight
    latent_to_model_projs.0              → model.patch_encoder.proj (patch size 1: one token per latent pixel)
    −model_to_latent_projs.0             → model.patch_decoder.proj_out (its flow is data − noise; ours noise − data)
    rotary_emb.freqs                     → rope_parameters.rope_theta (checked to be a standard RoPE table)

Special ids: <|bos|> = its sos id (num_text_tokens), <|eos|> = eos, <|pad|> = its null-text id, <|boi|>/<|eoi|> = its
start/end-of-modality ids, <|image|> = a new last row. Its meta and character tokens keep their rows.

Options (constructor keyword arguments):

- mapped: num_text_tokens, dim_latent (one modality; patch_dim = dim_latent), channel_first_latent, transformer.dim,
  depth, dim_head, heads, ff_expansion_factor, dropout, use_flex_attn, unet_skips, attn_kwargs.softcap_value,
  modality_default_shape, flow/text loss weights, prob_uncond (→ caption_drop_prob), odeint_kwargs (sampling only);
- refused (they change the text computation and have no counterpart here; build the source without them):
  qk_rmsnorm=True (the default!), attn_kwargs.gate_values=True (the default!), use_value_residual, attn_laser /
  attn_kwargs.laser, add_pos_emb, several modalities, model_output_clean, pre_post_transformer_enc_dec,
  modality_encoder/modality_decoder, custom rotary frequencies; any option not listed here.

Built into 0.20.0 with no counterpart here, so dropped and listed in the report — the converted model is therefore an
*initialisation* to fine-tune, not an equivalent: the attention residual over all earlier layers (layers.i.3), the
U-Net skip projections (layers.i.0; `unet_skips=False` fails in 0.20.0's own forward), the adaptive layer norm of
image tokens (to_film, to_ada_ln_zero), the random-Fourier timestep embedding (to_time_cond), the attention logit
soft-cap (50), and the text path's mean-centred LayerNorm (mapped to RMSNorm with the same gain).
"""

import argparse
import json
import re
from pathlib import Path

import torch

SUPPORTED_VERSION = "0.20.0"
MAPPED_OPTIONS = {
    "num_text_tokens", "transformer", "dim_latent", "channel_first_latent", "modality_default_shape",
    "modality_num_dim", "flow_loss_weight", "text_loss_weight", "velocity_consistency_loss_weight",
    "reconstruction_loss_weight", "ignore_index", "odeint_kwargs", "eps", "prob_uncond", "modality_processing",
    "fallback_to_default_shape_if_invalid", "modality_encoder_decoder_requires_batch_dim",
}  # fmt: skip
MAPPED_TRANSFORMER_OPTIONS = {
    "dim", "depth", "dim_head", "heads", "dropout", "ff_expansion_factor", "attn_kwargs", "ff_kwargs", "unet_skips",
    "use_flex_attn", "qk_rmsnorm", "attn_laser", "use_value_residual",
}  # fmt: skip
MAPPED_ATTENTION_OPTIONS = {"softcap_value", "gate_values", "laser", "learned_value_residual_mix", "dropout"}
# options whose non-default value (or whose default, marked) has no counterpart: (path, refused when, why)
REFUSED = [
    ("transformer.qk_rmsnorm", lambda v: v is not False,
     "per-head RMSNorm of queries and keys (qk_rmsnorm defaults to True: build with qk_rmsnorm=False)"),
    ("transformer.attn_kwargs.gate_values", lambda v: v is not False,
     "sigmoid gates on the attention values "
     "(gate_values defaults to True: build with attn_kwargs=dict(gate_values=False))"),
    ("transformer.use_value_residual", bool, "value residual learning"),
    ("transformer.attn_laser", bool, "LASER attention"),
    ("transformer.attn_kwargs.laser", bool, "LASER attention"),
    ("transformer.attn_kwargs.learned_value_residual_mix", bool, "value residual mixing"),
    ("add_pos_emb", lambda v: bool(v) and v != [False], "axial positional embeddings of modality tokens"),
    ("model_output_clean", bool, "x0 (clean) prediction instead of the flow"),
    ("pre_post_transformer_enc_dec", lambda v: v is not None, "custom U-Net patch encoder/decoder modules"),
    ("modality_encoder", lambda v: v is not None, "its own modality encoder (use our VAE instead)"),
    ("modality_decoder", lambda v: v is not None, "its own modality decoder (use our VAE instead)"),
]  # fmt: skip
DROPPED = {  # key pattern → reason, for the report
    r"^transformer\.to_time_cond\.": "random-Fourier timestep embedding (our time_embed is freshly initialised)",
    r"\.to_film\.": "adaptive LayerNorm of image tokens",
    r"\.to_ada_ln_zero\.": "adaLN-zero gate of image tokens",
    r"^transformer\.layers\.\d+\.3\.": "attention residual over earlier layers",
    r"^transformer\.layers\.\d+\.0\.weight$": "U-Net skip projection",
    r"\.fn\.[qk]_norm\.": "query/key norm (unused with qk_rmsnorm=False)",
}


def _get(options: dict, path: str):
    value = options
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def check_options(options: dict) -> None:
    """Raise ValueError listing every option with no counterpart here (and any option this converter does not know)."""
    problems = []
    unknown = sorted(set(options) - MAPPED_OPTIONS - {path.split(".")[0] for path, _, _ in REFUSED})
    transformer = options.get("transformer") or {}
    if not isinstance(transformer, dict):
        problems.append("transformer must be the keyword dict of Transformer(...), not a module")
        transformer = {}
    unknown += [f"transformer.{k}" for k in sorted(set(transformer) - MAPPED_TRANSFORMER_OPTIONS)]
    attn = transformer.get("attn_kwargs") or {}
    unknown += [f"transformer.attn_kwargs.{k}" for k in sorted(set(attn) - MAPPED_ATTENTION_OPTIONS)]
    if unknown:
        problems.append(f"unknown option(s) {unknown} (this converter knows transfusion-pytorch {SUPPORTED_VERSION})")
    for path, refused, why in REFUSED:
        value = _get(options, path)
        if path == "transformer.qk_rmsnorm" and "qk_rmsnorm" not in transformer:
            value = True  # the default
        if path == "transformer.attn_kwargs.gate_values" and "gate_values" not in attn:
            value = True  # the default
        if value is not None and refused(value):
            problems.append(f"{path}={value!r}: {why}")
    dim_latent = options.get("dim_latent")
    if isinstance(dim_latent, (list, tuple)) and len(dim_latent) > 1:
        problems.append(f"dim_latent={dim_latent!r}: several modalities; Transfusion here has one image modality")
    if problems:
        raise ValueError("Cannot convert this transfusion-pytorch model: " + "; ".join(problems))


def _interleaved_to_half(weight: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Rows (heads·d, D) of q or k: reorder each head from RoPE pairs (0,1),(2,3),… (rotary-embedding-torch) to
    rotate-half pairs (i, i + d/2) (Llama), so both models rotate the same coordinates together."""
    order = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    return weight.view(heads, head_dim, -1)[:, order].reshape(heads * head_dim, -1)


def _rope_theta(freqs: torch.Tensor, head_dim: int) -> float:
    theta = float(freqs[1] ** (-head_dim / 2)) if len(freqs) > 1 else 10000.0
    expected = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    if freqs.shape != expected.shape or not torch.allclose(freqs.float(), expected, rtol=1e-4):
        raise ValueError(
            "rotary_emb.freqs is not a standard RoPE table 1/θ^(2i/d); custom frequencies have no counterpart"
        )
    return round(theta, 3)


def transfusion_config(options: dict, state: dict, latent_size: int = 8, vae_config: dict | None = None):
    from modeling_transfusion import TransfusionConfig
    from modeling_transfusion.configuration_transfusion import TINY_VAE

    t = options["transformer"]
    dim, heads, dim_head = t["dim"], t.get("heads", 8), t.get("dim_head", 64)
    n_text = options["num_text_tokens"]
    dim_latent = options.get("dim_latent") or dim
    dim_latent = dim_latent[0] if isinstance(dim_latent, (list, tuple)) else dim_latent
    vocab = state["text_embed.weight"].shape[0]
    vae_config = dict(vae_config or TINY_VAE)
    vae_config["latent_channels"] = dim_latent
    return TransfusionConfig(
        vocab_size=vocab + 1,
        hidden_size=dim,
        intermediate_size=int(dim * t.get("ff_expansion_factor", 4) * 2 / 3),
        num_hidden_layers=t["depth"],
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=dim_head,
        hidden_act="gelu",
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": _rope_theta(state["rotary_emb.freqs"], dim_head)},
        attention_bias=False,
        mlp_bias=True,
        tie_word_embeddings=False,
        bos_token_id=n_text,
        eos_token_id=n_text + 1,
        pad_token_id=n_text + 2,
        boi_token_id=n_text + 3,
        eoi_token_id=n_text + 4,
        image_token_id=vocab,
        latent_channels=dim_latent,
        latent_size=latent_size,
        patch_size=1,
        patch_encoder="linear",
        vae_config=vae_config,
        diffusion_type="flow_matching",
        prediction_type="flow",
        diffusion_loss_weight=float(options.get("flow_loss_weight", 1.0)) / float(options.get("text_loss_weight", 1.0)),
        caption_drop_prob=float(options.get("prob_uncond", 0.1)),
    )


def map_state_dict(state: dict, config) -> tuple[dict, dict]:
    """transfusion-pytorch tensors → our names. Returns (our state dict entries, report)."""
    c = config
    heads, d, inner = c.num_attention_heads, c.head_dim, c.intermediate_size
    out, used = {}, set()

    def take(key, shape=None):
        if key not in state:
            raise ValueError(f"The state dict has no {key}; is it from transfusion-pytorch {SUPPORTED_VERSION}?")
        if shape is not None and tuple(state[key].shape) != tuple(shape):
            raise ValueError(f"{key}: shape {list(state[key].shape)} differs from {list(shape)} implied by the options")
        used.add(key)
        return state[key].float()

    D = c.hidden_size
    for i in range(c.num_hidden_layers):
        src, dst = f"transformer.layers.{i}", f"model.layers.{i}"
        attn_scale = take(f"{src}.1.layerscale", (D,)) + 1
        ff_scale = take(f"{src}.2.layerscale", (D,)) + 1
        out[f"{dst}.input_layernorm.weight"] = take(f"{src}.1.layernorm_gamma", (D,)) + 1
        out[f"{dst}.post_attention_layernorm.weight"] = take(f"{src}.2.layernorm_gamma", (D,)) + 1
        qk = take(f"{src}.1.fn.to_qk.0.weight", (2 * heads * d, D))
        out[f"{dst}.self_attn.q_proj.weight"] = _interleaved_to_half(qk[: heads * d], heads, d)
        out[f"{dst}.self_attn.k_proj.weight"] = _interleaved_to_half(qk[heads * d :], heads, d)
        out[f"{dst}.self_attn.v_proj.weight"] = take(f"{src}.1.fn.to_v.0.weight", (heads * d, D))
        o_proj = take(f"{src}.1.fn.to_out.1.weight", (D, heads * d))
        out[f"{dst}.self_attn.o_proj.weight"] = attn_scale[:, None] * o_proj
        w_in, b_in = take(f"{src}.2.fn.net.0.weight", (2 * inner, D)), take(f"{src}.2.fn.net.0.bias", (2 * inner,))
        out[f"{dst}.mlp.up_proj.weight"], out[f"{dst}.mlp.gate_proj.weight"] = w_in[:inner], w_in[inner:]
        out[f"{dst}.mlp.up_proj.bias"], out[f"{dst}.mlp.gate_proj.bias"] = b_in[:inner], b_in[inner:]
        out[f"{dst}.mlp.down_proj.weight"] = ff_scale[:, None] * take(f"{src}.2.fn.net.3.weight", (D, inner))
        out[f"{dst}.mlp.down_proj.bias"] = ff_scale * take(f"{src}.2.fn.net.3.bias", (D,))
    out["model.norm.weight"] = take("transformer.norm.gamma", (D,)) + 1
    used.add("rotary_emb.freqs")

    vocab = c.vocab_size - 1
    for src, dst in (("text_embed.weight", "model.embed_tokens.weight"), ("to_text_logits.weight", "lm_head.weight")):
        rows = take(src, (vocab, D))
        out[dst] = torch.cat([rows, rows[: c.bos_token_id].mean(0, keepdim=True)])  # <|image|>: mean of the text rows
    if "latent_to_model_projs.0.weight" in state:
        out["model.patch_encoder.proj.weight"] = take("latent_to_model_projs.0.weight", (D, c.patch_dim))
        out["model.patch_encoder.proj.bias"] = take("latent_to_model_projs.0.bias", (D,))
    else:  # nn.Identity when dim_latent == dim
        out["model.patch_encoder.proj.weight"] = torch.eye(D, c.patch_dim)
        out["model.patch_encoder.proj.bias"] = torch.zeros(D)
    out["model.patch_decoder.proj_out.weight"] = -take("model_to_latent_projs.0.weight", (c.patch_dim, D))
    out["model.patch_decoder.proj_out.bias"] = torch.zeros(c.patch_dim)

    left = sorted(set(state) - used)
    dropped, unexpected = {}, []
    for key in left:
        reason = next((why for pattern, why in DROPPED.items() if re.search(pattern, key)), None)
        if reason is None:
            unexpected.append(key)
        else:
            dropped.setdefault(reason, []).append(key)
    if unexpected:
        raise ValueError(
            "The state dict has tensors of modules with no counterpart and not covered by the options: "
            f"{unexpected[:6]}"
            + (f" … ({len(unexpected)} in all)" if len(unexpected) > 6 else "")
            + " (e.g. gate_values, value residual, positional embeddings or extra modalities were enabled)"
        )
    report = {"mapped_tensors": len(used), "dropped": {why: len(keys) for why, keys in dropped.items()}}
    return out, report


def load_state(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--weights {path}: no such file (a .safetensors or .pt state dict)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err}): empty, "
                             "truncated or not safetensors") from None  # fmt: skip
        return _finite(state, path)
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError):
        # torch's own message advises weights_only=False, i.e. running the file's code: never do that
        raise ValueError(
            f"{path} holds more than tensors (or is damaged), so it is not loaded: a .pt file may only hold a state "
            "dict of tensors. Save the weights with "
            "safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors (a dict name → tensor, or {{'model': that dict}})")
    return _finite(state, path)


def _finite(state: dict, path: Path) -> dict:
    if not state:
        raise ValueError(f"{path} holds no tensors")
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: tensor {name} holds NaN or infinite values; the file is damaged")
    return state


def convert(weights, options: dict | str | Path, latent_size: int = 8, vae: str | None = None):
    """(state dict file, constructor kwargs) → (TransfusionForCausalLM, report)."""
    from modeling_transfusion import TransfusionForCausalLM

    if not isinstance(options, dict):
        options_path = Path(options)
        try:
            options = json.loads(options_path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(
                f"--config {options_path}: not a readable JSON file of Transfusion keyword arguments ({err})"
            ) from None
        if not isinstance(options, dict):
            raise ValueError(f"--config {options_path}: expected a JSON object of Transfusion keyword arguments")
    check_options(options)
    state = load_state(weights)
    vae_model = vae_config = None
    if vae is not None:
        from conversion.convert_llama_to_transfusion import load_vae

        vae_model, vae_config = load_vae(vae)
        if vae_config.get("latent_channels") != (options.get("dim_latent") or options["transformer"]["dim"]):
            raise ValueError(f"The VAE has {vae_config.get('latent_channels')} latent channels, the source model's "
                             f"dim_latent is {options.get('dim_latent')}")  # fmt: skip
    config = transfusion_config(options, state, latent_size, vae_config)
    mapped, report = map_state_dict(state, config)
    model = TransfusionForCausalLM(config)
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    assert not unexpected, unexpected
    if vae_model is not None:
        model.model.vae.load_state_dict(vae_model.state_dict())
    report["freshly_initialised"] = sorted({".".join(k.split(".")[:2 if ".vae." in k else 3]) for k in missing})
    report["special_ids"] = {n: getattr(config, f"{n}_token_id") for n in ("bos", "eos", "pad", "boi", "eoi", "image")}
    return model.eval(), report


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m conversion.convert_transfusion_pytorch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--weights", required=True, help="state dict of a transfusion_pytorch.Transfusion (.safetensors/.pt)"
    )
    p.add_argument("--config", required=True, help="JSON file of the keyword arguments it was built with")
    p.add_argument("--output", required=True, help="model folder to write")
    p.add_argument("--latent-size", type=int, default=8, help="latent height/width (patch size is 1); default 8")
    p.add_argument("--vae", help="AutoencoderKL folder with dim_latent latent channels (default: a fresh tiny VAE)")
    args = p.parse_args(argv)
    model, report = convert(args.weights, args.config, args.latent_size, args.vae)
    out = Path(args.output)
    model.save_pretrained(out)
    (out / "conversion_report.json").write_text(json.dumps(report, indent=2) + "\n")
    dropped = ", ".join(f"{n} × {why}" for why, n in report["dropped"].items())
    print(f"mapped {report['mapped_tensors']} tensors; dropped (no counterpart): {dropped or 'nothing'}")
    print(
        f"wrote the model to {out}/ (no tokenizer: transfusion-pytorch uses raw ids; "
        f"special ids {report['special_ids']})"
    )
    return out


if __name__ == "__main__":
    main()
