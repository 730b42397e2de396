"""Transfusion (Zhou et al. 2024, arXiv 2408.11039): one Llama-style transformer that predicts the next text token and
denoises continuous image latents in the same sequence.

Shape legend
    B  batch rows                     L  tokens in this call          S  past (cached) + L tokens
    D  hidden size                    H  attention heads              Hkv key/value heads, d head dim
    V  vocabulary                     N  images in the call (all rows, row-major order)
    C  latent channels                h×w latent height × width       p  patch size
    n  image slots per image = (h/p)·(w/p)                            P  patch vector C·p·p

An image sits in the sequence as `<|boi|>` + n `<|image|>` slots + `<|eoi|>`. At the slots the backbone reads patch
embeddings instead of token embeddings, and the image decoder turns the hidden states there into the diffusion
prediction (ε, v, x0 or a flow velocity); encoders and decoders live in `patching_transfusion.py`. The attention mask
is causal, and bidirectional among the slots of one image. The model predicts; a diffusers scheduler owns the noise (see `TransfusionForCausalLM.forward`).
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ModelOutput
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel

from .configuration_transfusion import TransfusionConfig
from .patching_transfusion import (
    LinearPatchDecoder,
    LinearPatchEncoder,
    TransfusionTimestepEmbedder,
    UNetPatchDecoder,
    UNetPatchEncoder,
)

# transformers ≥ 5.24 renamed the cache keyword `past_key_values` → `cache`, in the mask builder as in forward().
_MASK_CACHE_KWARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


# ---------------------------------------------------------------------------------------------------------------
# Sequence description and mask
# ---------------------------------------------------------------------------------------------------------------
def image_block_ids(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """(B, L) ids → (B, L) block ids: −1 for text, k for the slots of the k-th image of the row."""
    is_image = input_ids == image_token_id
    starts = is_image & ~F.pad(is_image, (1, 0))[:, :-1]  # first slot of each run of image slots
    block = starts.long().cumsum(-1) - 1
    return torch.where(is_image, block, torch.full_like(block, -1))


def transfusion_attention_mask(block_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reference mask, written out: (B, L) block ids → (B, 1, L, L) bool, True where query i may attend to key j.

    Causal everywhere, plus bidirectional among positions of the same image block; padded keys are masked.
    The model builds the same mask with transformers' `create_causal_mask` (tests hold the two equal).
    """
    length = block_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=block_ids.device).tril()
    same_image = (block_ids[:, :, None] == block_ids[:, None, :]) & (block_ids[:, :, None] >= 0)
    allowed = causal[None] | same_image
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]
    return allowed[:, None]


def crop_cache(cache: Cache, length: int) -> None:
    """Crop `cache` back to its first `length` positions.

    A negative argument to `crop` means "remove that many tokens" in every transformers release we support
    (5.24 accepts nothing else), so this is the one place that calls it.
    """
    extra = cache.get_seq_length() - length
    if extra < 0:
        raise ValueError(f"Cannot crop a cache of {cache.get_seq_length()} tokens to {length} tokens")
    if extra:
        cache.crop(-extra)


# ---------------------------------------------------------------------------------------------------------------
# Backbone: Llama-style decoder with HF-canonical module names
# ---------------------------------------------------------------------------------------------------------------
class TransfusionRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class TransfusionRotaryEmbedding(nn.Module):
    """1-D RoPE over sequence positions (the paper's), with transformers' scaled variants for converted checkpoints."""

    def __init__(self, config: TransfusionConfig):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        init_fn = self.compute_default_rope_parameters if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: TransfusionConfig, *args, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)  # (B, L, d/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, L, d)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, L, d): broadcast over heads
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, S, d) → (B, H, S, d) for grouped-query attention."""
    if n_rep == 1:
        return hidden_states
    batch, kv_heads, length, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None].expand(batch, kv_heads, n_rep, length, head_dim)
    return hidden_states.reshape(batch, kv_heads * n_rep, length, head_dim)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """The reference attention: softmax(q·kᵀ·scale + mask)·v, with the additive float mask from the mask builder."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, L, S)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            attention_mask = torch.zeros_like(scores).masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        scores = scores + attention_mask
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, L, H, d)
    return output, weights


class TransfusionAttention(nn.Module):
    def __init__(self, config: TransfusionConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, H, L, d)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, Hkv, L, d)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)  # (B, Hkv, S, d)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
        )
        output = self.o_proj(output.reshape(*input_shape, -1).contiguous())
        return output, weights


class TransfusionMLP(nn.Module):
    def __init__(self, config: TransfusionConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class TransfusionDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: TransfusionConfig, layer_idx: int):
        super().__init__()
        self.self_attn = TransfusionAttention(config, layer_idx)
        self.mlp = TransfusionMLP(config)
        self.input_layernorm = TransfusionRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = TransfusionRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, past_key_values=None, **kwargs):
        residual = hidden_states
        hidden_states, weights = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, past_key_values
        )
        hidden_states = residual + hidden_states
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, weights


# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class TransfusionModelOutputWithPast(ModelOutput):
    """
    last_hidden_state: (B, L, D) after the final norm.
    image_predictions: (N, C, h, w) the image decoder's output at the image slots (ε, v, x0 or velocity).
    """

    last_hidden_state: torch.FloatTensor | None = None
    image_predictions: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class TransfusionCausalLMOutputWithPast(ModelOutput):
    """
    loss: lm_loss + diffusion_loss_weight · diffusion_loss (when `labels` were given).
    logits: (B, L, V) text logits. image_predictions: (N, C, h, w).
    image_timesteps: (N,) the timesteps the images were run at (sampled in training).
    """

    loss: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    diffusion_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    image_predictions: torch.FloatTensor | None = None
    image_timesteps: torch.Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------
class TransfusionPreTrainedModel(PreTrainedModel):
    config_class = TransfusionConfig
    config: TransfusionConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TransfusionDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = False  # flash kernels take no arbitrary mask; the image blocks need one
    _supports_flex_attn = False
    _supports_attention_backend = False

    def _init_weights(self, module: nn.Module):
        """The one place weights are initialised.

        - Output projections of the image decoder are zero (`_zero_init`), so a fresh model predicts 0 for images.
        - The VAE and the U-Net convolutions keep their own torch init (`reset_parameters`); the LM's normal(0, 0.02)
          is wrong for them. Loaded tensors are never touched.
        - Everything else follows transformers' defaults (normal(0, σ) linears/embeddings, unit norms, RoPE buffers).
        """
        own = list(module.parameters(recurse=False))
        loaded = any(getattr(p, "_is_hf_initialized", False) for p in own)
        if getattr(module, "_zero_init", False):
            init.zeros_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif getattr(module, "_torch_init", False):
            if own and not loaded and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        else:
            super()._init_weights(module)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        try:
            model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except Exception as error:  # a damaged weights file surfaces from deep inside safetensors
            if "SafetensorError" not in type(error).__name__ and "deserializ" not in str(error):
                raise
            raise ValueError(
                f"A weights file under {pretrained_model_name_or_path} is truncated or corrupted "
                f"({_damaged_files(pretrained_model_name_or_path) or error}); re-save or re-download the checkpoint"
            ) from error
        vae = getattr(model, "vae", None)  # TransfusionModel's attribute, TransfusionForCausalLM's property
        if vae is not None:
            vae.requires_grad_(False)  # loading re-wraps tensors as trainable parameters
        return model

    @staticmethod
    def _mark_torch_init(root: nn.Module) -> None:
        for m in root.modules():
            if isinstance(m, (nn.Conv2d, nn.GroupNorm, nn.Linear)) and not getattr(m, "_zero_init", False):
                m._torch_init = True


class TransfusionModel(TransfusionPreTrainedModel):
    """The backbone with its image path: token embeddings, patch encoder, timestep embedder, decoder layers, final
    norm, patch decoder, and the frozen VAE that maps pixels to latents."""

    def __init__(self, config: TransfusionConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([TransfusionDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = TransfusionRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = TransfusionRotaryEmbedding(config)
        self.time_embed = TransfusionTimestepEmbedder(config)
        if config.patch_encoder == "unet":
            self.image_encoder, self.image_decoder = UNetPatchEncoder(config), UNetPatchDecoder(config)
            self._mark_torch_init(self.image_encoder)
            self._mark_torch_init(self.image_decoder)
        else:
            self.image_encoder, self.image_decoder = LinearPatchEncoder(config), LinearPatchDecoder(config)
        self.vae = AutoencoderKL.from_config(config.vae_config)
        self._mark_torch_init(self.vae)
        self.vae.requires_grad_(False)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()  # frozen: never in training mode
        return self

    # -- pixels ↔ latents ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [−1, 1] → scaled latents (N, C, h, w) (the posterior's mode)."""
        expected = (self.vae.config.in_channels, self.config.image_size, self.config.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape (num_images, {expected[0]}, {expected[1]}, {expected[2]}), got "
                f"{tuple(pixel_values.shape)}; resize images to {expected[1]}×{expected[2]} (the processor does this)"
            )
        vae = self.vae
        latents = vae.encode(pixel_values.to(vae.dtype)).latent_dist.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (N, C, h, w) → pixels (N, 3, H, W) in [−1, 1]."""
        vae = self.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample.clamp(-1, 1)

    # -- forward -----------------------------------------------------------------------------------------------------
    def _check_image_inputs(self, input_ids, image_latents, image_timesteps):
        c = self.config
        blocks = image_block_ids(input_ids, c.image_token_id)
        n_slots = int((blocks >= 0).sum())
        n_images = n_slots // c.image_slots
        if n_slots:
            counts = torch.stack([(blocks == k).sum(-1) for k in range(int(blocks.max()) + 1)])  # (K, B)
            if ((counts != 0) & (counts != c.image_slots)).any():
                raise ValueError(
                    f"Every image must occupy exactly {c.image_slots} consecutive <|image|> slots "
                    f"(image_token_id={c.image_token_id}); found runs of {sorted(set(counts[counts > 0].tolist()))}"
                )
        if image_latents is None:
            if n_slots:
                raise ValueError(
                    f"input_ids hold {n_images} image(s) ({n_slots} <|image|> slots) but no image_latents or "
                    "pixel_values were given"
                )
            return blocks, 0
        expected = (c.latent_channels, c.latent_size, c.latent_size)
        if image_latents.ndim != 4 or tuple(image_latents.shape[1:]) != expected:
            raise ValueError(f"image_latents must have shape (num_images, {expected}), got {tuple(image_latents.shape)}")
        if image_latents.shape[0] != n_images:
            raise ValueError(
                f"Number of images ({image_latents.shape[0]}) does not match the image slots in input_ids "
                f"({n_slots} slots = {n_images} images of {c.image_slots} slots)"
            )
        if image_timesteps is not None and image_timesteps.shape != (n_images,):
            raise ValueError(f"image_timesteps must have shape ({n_images},), got {tuple(image_timesteps.shape)}")
        return blocks, n_images

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        image_latents: torch.FloatTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_timesteps: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> TransfusionModelOutputWithPast:
        past_key_values = kwargs.pop("cache", past_key_values)  # transformers ≥ 5.24 keyword
        if input_ids is None:
            raise ValueError("TransfusionModel needs input_ids: they say where the images sit in the sequence")
        if inputs_embeds is not None:
            raise ValueError("Pass input_ids (and image_latents/pixel_values), not inputs_embeds")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            bad = input_ids[(input_ids < 0) | (input_ids >= self.config.vocab_size)]
            raise ValueError(
                f"input_ids contain id(s) {sorted(set(bad.tolist()))[:5]} outside the vocabulary "
                f"[0, {self.config.vocab_size}); check the tokenizer matches this model"
            )
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if pixel_values is not None and image_latents is None:
            image_latents = self.encode_images(pixel_values)
        blocks, n_images = self._check_image_inputs(input_ids, image_latents, image_timesteps)

        batch, length = input_ids.shape
        inputs_embeds = self.embed_tokens(input_ids)  # (B, L, D)
        temb = skips = None
        if n_images:
            if image_timesteps is None:
                image_timesteps = torch.zeros(n_images, device=input_ids.device)
            temb = self.time_embed(image_timesteps, inputs_embeds.dtype)  # (N, D)
            image_tokens, skips = self.image_encoder(image_latents, temb)  # (N, n, D)
            slots = (blocks >= 0)[..., None]
            inputs_embeds = inputs_embeds.masked_scatter(slots, image_tokens.to(inputs_embeds.dtype))

        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(batch, past_length + length, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            # Positions count only attended tokens, so left padding and dropped captions shift nothing.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]

        block_sequence_ids = None
        if n_images and self.config.image_attention == "bidirectional":
            block_sequence_ids = F.pad(blocks, (past_length, 0), value=-1)  # full length: past + current
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            block_sequence_ids=block_sequence_ids,
            **{_MASK_CACHE_KWARG: past_key_values},
        )

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden, all_attn = [], []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden_states)
            hidden_states, weights = layer(
                hidden_states,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                past_key_values=past_key_values,
            )
            if output_attentions:
                all_attn.append(weights)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden.append(hidden_states)

        image_predictions = None
        if n_images:
            image_hidden = hidden_states[blocks >= 0].view(n_images, self.config.image_slots, -1)  # (N, n, D)
            image_predictions = self.image_decoder(image_hidden, temb, skips)  # (N, C, h, w)

        return TransfusionModelOutputWithPast(
            last_hidden_state=hidden_states,
            image_predictions=image_predictions,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attn) if output_attentions else None,
        )


class TransfusionForCausalLM(TransfusionPreTrainedModel, GenerationMixin):
    """Transfusion with its text head. `forward(..., labels=...)` is the training objective
    L = L_LM + λ·L_diffusion; without labels it runs the images at the given timesteps (0 = clean) for inference."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TransfusionConfig):
        super().__init__(config)
        self.model = TransfusionModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._noise_scheduler = None
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    @property
    def noise_scheduler(self):
        """The diffusers scheduler that noises training images (None for flow matching: closed form). Built on first
        use, so it never lands on the meta device that `from_pretrained` builds models on."""
        if self._noise_scheduler is None:
            self._noise_scheduler = _build_noise_scheduler(self.config)
        return self._noise_scheduler

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    @property
    def vae(self) -> AutoencoderKL:
        return self.model.vae

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_images(pixel_values)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.model.decode_latents(latents)

    @staticmethod
    def crop_cache(cache: Cache, length: int) -> None:
        crop_cache(cache, length)

    # -- training objective ----------------------------------------------------------------------------------------
    def _image_follows_text(self, input_ids, attention_mask, blocks) -> torch.Tensor:
        """(N,) bool: the image is followed by text in its row, i.e. it comes before its caption (noise limiting)."""
        c = self.config
        structural = torch.tensor(
            [t for t in (c.bos_token_id, c.pad_token_id, c.boi_token_id, c.eoi_token_id, c.image_token_id) if t is not None]
            + ([c.eos_token_id] if isinstance(c.eos_token_id, int) else list(c.eos_token_id or [])),
            device=input_ids.device,
        )
        is_text = ~torch.isin(input_ids, structural) & attention_mask.bool()
        text_after = is_text.flip(-1).long().cumsum(-1).flip(-1) > 0  # (B, L): text at or after this position
        last_slot = (blocks >= 0) & (F.pad(blocks, (0, 1), value=-1)[:, 1:] != blocks)  # one per image, row-major
        return text_after[last_slot]

    def _drop_captions(self, input_ids, attention_mask, labels, blocks):
        """Caption dropout for classifier-free guidance: in a row whose first image follows text, with probability
        `caption_drop_prob` hide that text (attention mask 0, so positions shift as if it were absent) and take the LM
        loss off the row, since an unconditional row looks like a captioning prompt (DESIGN §9)."""
        c = self.config
        first_image = (blocks >= 0).float().argmax(-1)  # (B,) first slot position (0 if none)
        has_image = (blocks >= 0).any(-1)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        before = positions[None] < (first_image[:, None] - 1)  # strictly before <|boi|>
        caption = before & (input_ids != c.bos_token_id) & attention_mask.bool()
        drop = has_image & caption.any(-1) & (torch.rand(input_ids.shape[0], device=input_ids.device) < c.caption_drop_prob)
        if not drop.any():
            return attention_mask, labels
        attention_mask = attention_mask.masked_fill(caption & drop[:, None], 0)
        labels = labels.masked_fill(drop[:, None], -100)
        return attention_mask, labels

    def _sample_timesteps(self, n_images, limited, device):
        c = self.config
        upper = torch.full((n_images,), float(c.num_train_timesteps), device=device)
        if c.noise_limit_timestep is not None:
            upper = torch.where(limited, torch.full_like(upper, c.noise_limit_timestep), upper)
        if c.diffusion_type == "flow_matching":
            return torch.rand(n_images, device=device) * upper  # continuous σ·T
        return (torch.rand(n_images, device=device) * upper).long().clamp(max=c.num_train_timesteps - 1)

    def _noise(self, latents, noise, timesteps):
        """Noised latents and the regression target, through the diffusers scheduler's conventions."""
        c = self.config
        if c.diffusion_type == "flow_matching":
            # FlowMatchEulerDiscreteScheduler: x_σ = (1 − σ)·x0 + σ·ε with σ = t / T; velocity target ε − x0.
            sigma = (timesteps.float() / c.num_train_timesteps).view(-1, 1, 1, 1)
            return (1 - sigma) * latents + sigma * noise, noise - latents
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if c.prediction_type == "epsilon":
            return noisy, noise
        if c.prediction_type == "v_prediction":
            return noisy, self.noise_scheduler.get_velocity(latents, noise, timesteps)
        return noisy, latents

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        image_latents: torch.FloatTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_timesteps: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> TransfusionCausalLMOutputWithPast:
        past_key_values = kwargs.pop("cache", past_key_values)  # transformers ≥ 5.24 keyword
        c = self.config
        if pixel_values is not None and image_latents is None:
            image_latents = self.model.encode_images(pixel_values)

        target = None
        if labels is not None and image_latents is not None and image_latents.shape[0]:
            if input_ids is None:
                raise ValueError("Training needs input_ids")
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            blocks = image_block_ids(input_ids, c.image_token_id)
            n_images = image_latents.shape[0]
            if image_timesteps is None:
                limited = self._image_follows_text(input_ids, attention_mask, blocks)
                image_timesteps = self._sample_timesteps(n_images, limited.to(input_ids.device), input_ids.device)
            noise = torch.randn_like(image_latents)
            image_latents, target = self._noise(image_latents, noise, image_timesteps)
            if self.training and c.caption_drop_prob > 0 and position_ids is None:
                attention_mask, labels = self._drop_captions(input_ids, attention_mask, labels, blocks)

        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            image_latents=image_latents,
            image_timesteps=image_timesteps,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)

        loss = lm_loss = diffusion_loss = None
        if labels is not None:
            lm_loss = self._lm_loss(logits, labels, input_ids, attention_mask)
            loss = lm_loss
            if target is not None:
                diffusion_loss = F.mse_loss(outputs.image_predictions.float(), target.float())
                loss = lm_loss + c.diffusion_loss_weight * diffusion_loss

        return TransfusionCausalLMOutputWithPast(
            loss=loss,
            lm_loss=lm_loss,
            diffusion_loss=diffusion_loss,
            logits=logits,
            image_predictions=outputs.image_predictions,
            image_timesteps=image_timesteps,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def _lm_loss(self, logits, labels, input_ids, attention_mask):
        """Next-token cross-entropy. Never on image slots, on the <|eoi|> that closes an image (it is appended, not
        predicted), or on padding."""
        c = self.config
        if logits.shape[1] != labels.shape[1]:
            raise ValueError("labels need logits for every position: call with logits_to_keep=0")
        labels = labels.clone()
        if input_ids is not None:
            ignore = (input_ids == c.image_token_id) | (input_ids == c.eoi_token_id)
            if attention_mask is not None:
                ignore |= ~attention_mask[:, -input_ids.shape[1] :].bool()
            labels = labels.masked_fill(ignore, -100)
        shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
        shift_labels = labels[:, 1:].reshape(-1)
        if (shift_labels != -100).sum() == 0:
            return shift_logits.sum() * 0.0
        return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)

    # -- generation ----------------------------------------------------------------------------------------------
    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        image_latents = kwargs.pop("image_latents", None)
        pixel_values = kwargs.pop("pixel_values", None)
        image_timesteps = kwargs.pop("image_timesteps", None)
        model_inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        # Images enter with the prompt (the prefill); later steps feed single text tokens and read them from the cache.
        step_ids = model_inputs.get("input_ids")
        if step_ids is not None and (step_ids == self.config.image_token_id).any():
            model_inputs.update(image_latents=image_latents, pixel_values=pixel_values, image_timesteps=image_timesteps)
        return model_inputs


def _damaged_files(folder) -> str:
    """Names of the .safetensors files in a local folder that cannot be opened."""
    from pathlib import Path

    from safetensors import safe_open

    damaged = []
    for path in sorted(Path(str(folder)).glob("*.safetensors")) if Path(str(folder)).is_dir() else []:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)
        except Exception as e:  # noqa: BLE001 - we report every unreadable file
            damaged.append(f"{path.name}: {e}")
    return "; ".join(damaged)


def _build_noise_scheduler(config: TransfusionConfig):
    if config.diffusion_type == "flow_matching":
        return None  # the interpolation is closed form (see `_noise`); sampling uses FlowMatchEulerDiscreteScheduler
    return DDPMScheduler.from_config(config.scheduler_config())


TransfusionModel.register_for_auto_class("AutoModel")
TransfusionForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "TransfusionModel",
    "TransfusionForCausalLM",
    "TransfusionPreTrainedModel",
    "TransfusionModelOutputWithPast",
    "TransfusionCausalLMOutputWithPast",
    "image_block_ids",
    "transfusion_attention_mask",
    "crop_cache",
]
