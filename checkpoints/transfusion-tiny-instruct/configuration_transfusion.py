"""Configuration of a Transfusion model: a Llama-style decoder, an image patch encoder/decoder, a VAE, diffusion."""

import copy
import math
from pathlib import Path

from transformers import PreTrainedConfig

# The paper's five sizes (Zhou et al. 2024, Table 1): layers / width / heads. The VAE is the paper's:
# 256×256 pixels → 32×32×8 latents, with 2×2 U-Net patches (256 image slots per image).
_PAPER_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 8,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 1.0,
}


def _paper(layers: int, width: int, heads: int) -> dict:
    # SwiGLU width: 8/3 of the model width rounded up to a multiple of 256, as in Llama.
    intermediate = 256 * math.ceil(width * 8 / 3 / 256)
    return {
        "num_hidden_layers": layers,
        "hidden_size": width,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "intermediate_size": intermediate,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "latent_channels": 8,
        "latent_size": 32,
        "patch_size": 2,
        "patch_encoder": "unet",
        "unet_block_out_channels": [256, 512],
        "vae_config": copy.deepcopy(_PAPER_VAE),
    }


# A tiny VAE (32×32 RGB → 8×8×4) used by the tests and by the bundled checkpoint.
TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 1.0,
}

PRESETS: dict[str, dict] = {
    "tiny": {
        "vocab_size": 300,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "latent_channels": 4,
        "latent_size": 8,
        "patch_size": 2,
        "patch_encoder": "linear",
        "unet_block_out_channels": [32, 64],
        "vae_config": copy.deepcopy(TINY_VAE),
    },
    "paper-0.16B": _paper(16, 768, 12),
    "paper-0.37B": _paper(24, 1024, 16),
    "paper-0.76B": _paper(24, 1536, 24),
    "paper-1.4B": _paper(24, 2048, 16),
    "paper-7B": _paper(32, 4096, 32),
}

PATCH_ENCODERS = ("linear", "unet")
IMAGE_ATTENTION = ("bidirectional", "causal")
DIFFUSION_TYPES = ("ddpm", "flow_matching")
MODALITY_EXPERTS = ("shared", "mot")
PREDICTION_TYPES = {"ddpm": ("epsilon", "v_prediction", "sample"), "flow_matching": ("flow",)}


class TransfusionConfig(PreTrainedConfig):
    r"""
    Configuration of [`TransfusionForCausalLM`].

    Backbone (Llama-style): `vocab_size`, `hidden_size`, `intermediate_size`, `num_hidden_layers`,
    `num_attention_heads`, `num_key_value_heads` (GQA), `head_dim`, `hidden_act`, `max_position_embeddings`,
    `rms_norm_eps`, `rope_parameters` (`{"rope_type": "default", "rope_theta": 10000.0}` by default),
    `attention_bias`, `attention_dropout`, `mlp_bias`, `tie_word_embeddings`, `initializer_range`.

    Images: a VAE (`vae_config`, the config dict of a diffusers `AutoencoderKL`) maps pixels to latents of
    `latent_channels` × `latent_size` × `latent_size`; the latent is cut into `patch_size` × `patch_size` patches,
    each one image slot in the sequence. `patch_encoder` is `"linear"` (a linear layer, timestep embedding added)
    or `"unet"` (diffusers ResNet down/up blocks conditioned on the timestep, channels `unet_block_out_channels`,
    one level per factor 2 of the patch size). `timestep_embed_dim` is the sinusoid's width. `image_attention`:
    `"bidirectional"` among the slots of one image (the paper's) or `"causal"` (the paper's ablation).
    `modality_experts`: `"shared"` (one set of weights for every position, the paper's) or `"mot"`
    (Mixture-of-Transformers, arXiv 2411.04996: each decoder layer and the final norm hold image copies of the
    attention projections, MLP and norms, used at the image slots; attention stays global).

    Diffusion: `diffusion_type` `"ddpm"` (the paper's; `prediction_type` epsilon|v_prediction|sample,
    `beta_schedule` default `squaredcos_cap_v2`, the cosine schedule) or `"flow_matching"` (`prediction_type`
    `"flow"`, velocity noise − x0). `num_train_timesteps` (1000), `diffusion_loss_weight` λ (5),
    `noise_limit_timestep` (500: the largest t for an image that precedes its caption), `caption_drop_prob`
    (the rate at which training drops the caption of a caption→image row, for classifier-free guidance).

    Special ids: `bos_token_id`, `eos_token_id`, `pad_token_id`, `boi_token_id`, `eoi_token_id`, `image_token_id`.

    Named sizes: `TransfusionConfig.from_preset("tiny" | "paper-0.16B" | … | "paper-7B", **overrides)`.
    """

    model_type = "transfusion"
    keys_to_ignore_at_inference = ["past_key_values"]

    # Backbone
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 512
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    # Special tokens (the tokenizer builder puts them first, in this order)
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = 2
    boi_token_id: int = 3
    eoi_token_id: int = 4
    image_token_id: int = 5
    # Images
    latent_channels: int = 4
    latent_size: int = 8
    patch_size: int = 2
    patch_encoder: str = "linear"
    unet_block_out_channels: list[int] | None = None
    unet_norm_groups: int = 32
    timestep_embed_dim: int = 256
    image_attention: str = "bidirectional"
    modality_experts: str = "shared"
    vae_config: dict | None = None
    # Diffusion
    diffusion_type: str = "ddpm"
    prediction_type: str = "epsilon"
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    diffusion_loss_weight: float = 5.0
    noise_limit_timestep: int | None = 500
    caption_drop_prob: float = 0.1

    def __post_init__(self, **kwargs):
        if self.head_dim is None and isinstance(self.num_attention_heads, int) and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads  # (validated below)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        if self.unet_block_out_channels is None:
            self.unet_block_out_channels = [64 * 2**i for i in range(int(math.log2(max(self.patch_size, 1))) + 1)]
        self.unet_block_out_channels = list(self.unet_block_out_channels)
        if self.vae_config is None:
            self.vae_config = copy.deepcopy(TINY_VAE)
        self.vae_config = dict(self.vae_config)
        super().__post_init__(**kwargs)
        self._validate_transfusion()

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """transformers' reader, refusing another model's config (it only warns, then builds a wrong model)."""
        where = Path(str(pretrained_model_name_or_path)) / kwargs.get("subfolder", "") / "config.json"
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        model_type = config_dict.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(
                f"{where} has model_type {model_type!r}: this is not a Transfusion model (model_type "
                f"{cls.model_type!r}); convert a Llama-family model with "
                "python -m conversion.convert_llama_to_transfusion"
            )
        return config_dict, kwargs

    def _validate_transfusion(self):
        def fail(field, value, allowed):
            raise ValueError(f"TransfusionConfig.{field}={value!r} is invalid: {allowed}")

        for field in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                      "num_key_value_heads", "head_dim", "max_position_embeddings", "latent_channels",
                      "latent_size"):  # fmt: skip
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(field, value, "must be a positive integer")
        special_count = 6  # <|bos|> <|eos|> <|pad|> <|boi|> <|eoi|> <|image|>
        if not isinstance(self.vocab_size, int) or self.vocab_size < special_count:
            fail("vocab_size", self.vocab_size, f"must be an integer ≥ {special_count} (the special tokens)")
        if self.hidden_size % self.num_attention_heads:
            fail(
                "hidden_size", self.hidden_size, f"must be divisible by num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            fail(
                "num_key_value_heads",
                self.num_key_value_heads,
                f"must divide num_attention_heads={self.num_attention_heads}",
            )
        if self.patch_encoder not in PATCH_ENCODERS:
            fail("patch_encoder", self.patch_encoder, f"allowed: {PATCH_ENCODERS}")
        p = self.patch_size
        if p < 1 or p & (p - 1):
            fail("patch_size", p, "must be a power of two (1, 2, 4, 8)")
        if self.latent_size % p:
            fail("latent_size", self.latent_size, f"must be divisible by patch_size={p}")
        if self.patch_encoder == "unet":
            levels = int(math.log2(p)) + 1
            if len(self.unet_block_out_channels) != levels:
                fail(
                    "unet_block_out_channels",
                    self.unet_block_out_channels,
                    f"needs log2(patch_size)+1 = {levels} entries (one per resolution)",
                )
            bad = [c for c in self.unet_block_out_channels if c % self.unet_norm_groups]
            if bad:
                fail(
                    "unet_block_out_channels",
                    bad,
                    f"each must be divisible by unet_norm_groups={self.unet_norm_groups}",
                )
        if self.modality_experts not in MODALITY_EXPERTS:
            fail("modality_experts", self.modality_experts, f"allowed: {MODALITY_EXPERTS}")
        if self.image_attention not in IMAGE_ATTENTION:
            fail("image_attention", self.image_attention, f"allowed: {IMAGE_ATTENTION}")
        if self.diffusion_type not in DIFFUSION_TYPES:
            fail("diffusion_type", self.diffusion_type, f"allowed: {DIFFUSION_TYPES}")
        if self.prediction_type not in PREDICTION_TYPES[self.diffusion_type]:
            fail(
                "prediction_type",
                self.prediction_type,
                f"with diffusion_type={self.diffusion_type!r} allowed: {PREDICTION_TYPES[self.diffusion_type]}",
            )
        if self.num_train_timesteps < 1:
            fail("num_train_timesteps", self.num_train_timesteps, "must be ≥ 1")
        if self.noise_limit_timestep is not None and not 0 < self.noise_limit_timestep <= self.num_train_timesteps:
            fail(
                "noise_limit_timestep", self.noise_limit_timestep, f"must be in (0, {self.num_train_timesteps}] or None"
            )
        if not 0.0 <= self.caption_drop_prob < 1.0:
            fail("caption_drop_prob", self.caption_drop_prob, "must be in [0, 1)")
        if self.diffusion_loss_weight < 0:
            fail("diffusion_loss_weight", self.diffusion_loss_weight, "must be ≥ 0")
        special = {
            name: getattr(self, name)
            for name in ("bos_token_id", "pad_token_id", "boi_token_id", "eoi_token_id", "image_token_id")
            if getattr(self, name) is not None
        }
        for name, value in special.items():
            if not 0 <= value < self.vocab_size:
                fail(name, value, f"must be in [0, vocab_size={self.vocab_size})")
        vae_latents = self.vae_config.get("latent_channels")
        if vae_latents is not None and vae_latents != self.latent_channels:
            fail("latent_channels", self.latent_channels, f"must equal vae_config['latent_channels']={vae_latents}")

    # Derived sizes -------------------------------------------------------------------------------------------
    @property
    def image_slots(self) -> int:
        """Number of sequence positions one image occupies (between <|boi|> and <|eoi|>)."""
        return (self.latent_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.latent_channels * self.patch_size**2

    @property
    def vae_downsample(self) -> int:
        return 2 ** (len(self.vae_config.get("block_out_channels", [0])) - 1)

    @property
    def image_size(self) -> int:
        """Pixel height/width of the images the VAE takes."""
        return self.latent_size * self.vae_downsample

    def scheduler_config(self) -> dict:
        """Config of the diffusers scheduler that noises images in training (and samples by default)."""
        if self.diffusion_type == "flow_matching":
            return {
                "_class_name": "FlowMatchEulerDiscreteScheduler",
                "num_train_timesteps": self.num_train_timesteps,
                "shift": 1.0,
            }
        return {
            "_class_name": "DDPMScheduler",
            "num_train_timesteps": self.num_train_timesteps,
            "beta_schedule": self.beta_schedule,
            "prediction_type": self.prediction_type,
            "clip_sample": False,
            # Stated, not left to each sampler's default: DPM-Solver's "linspace" starts at t = 999, where the cosine
            # schedule leaves almost no signal and an ε-prediction's x0 estimate blows up (prompted-class accuracy
            # 0.14 instead of 0.86 on the bundled model). "leading" starts about one stride below (DDIM 950,
            # DPM-Solver 940 at 20 steps).
            "timestep_spacing": "leading",
        }

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TransfusionConfig":
        """A named size: `tiny` (tests) or the paper's `paper-0.16B`, `paper-0.37B`, `paper-0.76B`, `paper-1.4B`,
        `paper-7B`. Keyword arguments override single fields."""
        if name not in PRESETS:
            raise ValueError(f"Unknown Transfusion preset {name!r}; available presets: {', '.join(PRESETS)}")
        return cls(**{**copy.deepcopy(PRESETS[name]), **overrides})


TransfusionConfig.register_for_auto_class()

__all__ = ["TransfusionConfig", "PRESETS"]
