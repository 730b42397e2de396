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
is causal, and bidirectional among the slots of one image. The model predicts for the latents and timesteps it is given;
noise belongs to the training objective (`diffusion_transfusion.py`) and to the sampling scheduler.
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ModelOutput
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel

from .checks_transfusion import (
    check_attention_mask,
    check_local_folder,
    damaged_files,
    weight_files,
    check_ids,
    check_image_inputs,
    check_labels,
    check_pixels,
    nonfinite_weights,
)
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
    return block_ids_from_slots(input_ids == image_token_id)


def block_ids_from_slots(is_image: torch.Tensor) -> torch.Tensor:
    """(B, L) bool image slots → (B, L) block ids: −1 for text, k for the slots of the k-th image of the row."""
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
        self.max_seq_len_cached = config.max_position_embeddings  # read by `dynamic_rope_update` (dynamic NTK)
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        init_fn = (
            self.compute_default_rope_parameters if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[self.rope_type]
        )
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
    @dynamic_rope_update  # recomputes inv_freq for the "dynamic" and "longrope" types as the sequence grows
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


class ModalityRouting:
    """Which positions are text and which are image slots, as flat indices computed once per forward: the routing of
    modality-specific weights (Mixture-of-Transformers). `split` gathers the two groups, `merge` scatters them back;
    each position runs through one expert only."""

    def __init__(self, image_positions: torch.Tensor):
        flat = image_positions.reshape(-1)  # (B·L,)
        self.shape = tuple(image_positions.shape)
        self.text = (~flat).nonzero().squeeze(-1)
        self.image = flat.nonzero().squeeze(-1)
        self.image_only = len(self.text) == 0  # a denoising step: no gathering needed

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, ·) → text rows (T, ·) and image rows (I, ·)."""
        flat = x.reshape(-1, x.shape[-1])
        return flat.index_select(0, self.text), flat.index_select(0, self.image)

    def merge(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """(T, ·) and (I, ·) → (B, L, ·)."""
        out = text.new_empty(len(self.text) + len(self.image), text.shape[-1])
        return out.index_copy(0, self.text, text).index_copy(0, self.image, image.to(text.dtype)).view(*self.shape, -1)


class TransfusionAttentionProjections(nn.Module):
    """q/k/v/o projections: the text path's live in `TransfusionAttention` itself (canonical names), the image experts'
    of a Mixture-of-Transformers layer in one of these (`image_self_attn`)."""

    def __init__(self, config: TransfusionConfig):
        super().__init__()
        d, bias = config.head_dim, config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * d, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * d, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * d, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * d, config.hidden_size, bias=bias)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


class TransfusionAttention(TransfusionAttentionProjections):
    """Self-attention over the whole sequence, computed once (`attend`). A Mixture-of-Transformers layer projects its
    text and image positions with their own weights and calls `attend` on the merged projections."""

    def __init__(self, config: TransfusionConfig, layer_idx: int):
        super().__init__(config)
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True

    def attend(
        self, query, key, value, position_embeddings, attention_mask, past_key_values=None, output_attentions=False
    ):
        """(B, L, H·d), (B, L, Hkv·d) ×2 projections → (B, L, H·d) attention output (before o_proj), weights."""
        input_shape = query.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = query.view(hidden_shape).transpose(1, 2)  # (B, H, L, d)
        key = key.view(hidden_shape).transpose(1, 2)  # (B, Hkv, L, d)
        value = value.view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)  # (B, Hkv, S, d)
        # Attention weights exist only in the eager reference: asking for them selects it for this call.
        implementation = "eager" if output_attentions else self.config._attn_implementation
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        output, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
        )
        return output.reshape(*input_shape, -1).contiguous(), weights

    def forward(
        self, hidden_states, position_embeddings, attention_mask, past_key_values=None, output_attentions=False
    ):
        output, weights = self.attend(
            *self.qkv(hidden_states), position_embeddings, attention_mask, past_key_values, output_attentions
        )
        return self.o_proj(output), weights


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
    """A Llama block. With `config.modality_experts == "mot"` (Mixture-of-Transformers) it also holds image experts —
    `image_self_attn` (q/k/v/o), `image_mlp`, `image_input_layernorm`, `image_post_attention_layernorm` — that the
    image slots use instead of the text weights; attention stays global over the whole sequence."""

    def __init__(self, config: TransfusionConfig, layer_idx: int):
        super().__init__()
        self.self_attn = TransfusionAttention(config, layer_idx)
        self.mlp = TransfusionMLP(config)
        self.input_layernorm = TransfusionRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = TransfusionRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.has_image_experts = config.modality_experts == "mot"
        if self.has_image_experts:
            self.image_self_attn = TransfusionAttentionProjections(config)
            self.image_mlp = TransfusionMLP(config)
            self.image_input_layernorm = TransfusionRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.image_post_attention_layernorm = TransfusionRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def _one_expert(self, x, attention_mask, position_embeddings, past_key_values, output_attentions, projections,
                    input_norm, mlp, post_norm):  # fmt: skip
        """The block with one set of weights for every position (dense, or a call of image slots only)."""
        attended, weights = self.self_attn.attend(
            *projections.qkv(input_norm(x)), position_embeddings, attention_mask, past_key_values, output_attentions
        )
        x = x + projections.o_proj(attended)
        return x + mlp(post_norm(x)), weights

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_embeddings=None,
        past_key_values=None,
        output_attentions=False,
        routing: ModalityRouting | None = None,
    ):
        if routing is None or not self.has_image_experts:  # no image slots in this call, or a dense model
            return self._one_expert(hidden_states, attention_mask, position_embeddings, past_key_values,
                                    output_attentions, self.self_attn, self.input_layernorm, self.mlp,
                                    self.post_attention_layernorm)  # fmt: skip
        if routing.image_only:
            return self._one_expert(hidden_states, attention_mask, position_embeddings, past_key_values,
                                    output_attentions, self.image_self_attn, self.image_input_layernorm,
                                    self.image_mlp, self.image_post_attention_layernorm)  # fmt: skip

        text, image = routing.split(hidden_states)  # (T, D), (I, D): each group through its own weights
        text_qkv = self.self_attn.qkv(self.input_layernorm(text))
        image_qkv = self.image_self_attn.qkv(self.image_input_layernorm(image))
        query, key, value = (routing.merge(t, i) for t, i in zip(text_qkv, image_qkv))
        attended, weights = self.self_attn.attend(
            query, key, value, position_embeddings, attention_mask, past_key_values, output_attentions
        )  # one attention over the whole sequence
        text_attended, image_attended = routing.split(attended)
        text = text + self.self_attn.o_proj(text_attended)
        image = image + self.image_self_attn.o_proj(image_attended)
        text = text + self.mlp(self.post_attention_layernorm(text))
        image = image + self.image_mlp(self.image_post_attention_layernorm(image))
        return routing.merge(text, image), weights


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
    loss: the next-token loss (when `labels` were given); the diffusion loss is the objective's
    (`TransfusionDiffusionObjective`), since only it knows the noise.
    logits: (B, L, V) text logits. image_predictions: (N, C, h, w).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    image_predictions: torch.FloatTensor | None = None
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
    _repeated_blocks = ["TransfusionDecoderLayer"]  # diffusers' regional compilation compiles one, reuses it
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
        check_local_folder(pretrained_model_name_or_path, kwargs.get("subfolder", ""))
        try:
            model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except Exception as error:  # a damaged weights file surfaces from deep inside safetensors
            if "SafetensorError" not in type(error).__name__ and "deserializ" not in str(error):
                raise
            raise ValueError(
                f"A weights file under {pretrained_model_name_or_path} is truncated or corrupted "
                f"({damaged_files(pretrained_model_name_or_path) or error}); re-save or re-download the checkpoint"
            ) from error
        loaded = model[0] if isinstance(model, tuple) else model  # (model, loading info) with output_loading_info
        damaged = nonfinite_weights(loaded)
        if damaged:
            files = weight_files(pretrained_model_name_or_path, kwargs.get("subfolder", ""))
            raise ValueError(
                f"The weights loaded from {pretrained_model_name_or_path} hold NaN or infinite values in "
                f"{', '.join(damaged[:5])}{' …' if len(damaged) > 5 else ''} (files: {files}); "
                "the checkpoint is damaged: re-save or re-download it"
            )
        vae = getattr(loaded, "vae", None)  # TransfusionModel's attribute, TransfusionForCausalLM's property
        if vae is not None:
            vae.requires_grad_(False)  # loading re-wraps tensors as trainable parameters
        return model

    def load_adapter(self, *args, **kwargs):
        """transformers' `load_adapter`, keeping the model's own record of how its weight names were converted at
        load time: transformers 5.23 replaces it with the adapter's renamings (`base_model.model.…`), so a later
        `save_pretrained` (after merging the adapter) would write every key under that prefix and reload as fresh
        weights."""
        own = vars(self).get("_weight_conversions", _NO_RECORD)
        result = super().load_adapter(*args, **kwargs)
        if own is _NO_RECORD:
            vars(self).pop("_weight_conversions", None)
        else:
            self._weight_conversions = own
        return result

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
        if config.modality_experts == "mot":
            self.image_norm = TransfusionRMSNorm(config.hidden_size, eps=config.rms_norm_eps)  # the image experts' own
        self.rotary_emb = TransfusionRotaryEmbedding(config)
        self.time_embed = TransfusionTimestepEmbedder(config)
        if config.patch_encoder == "unet":
            self.patch_encoder, self.patch_decoder = UNetPatchEncoder(config), UNetPatchDecoder(config)
            self._mark_torch_init(self.patch_encoder)
            self._mark_torch_init(self.patch_decoder)
        else:
            self.patch_encoder, self.patch_decoder = LinearPatchEncoder(config), LinearPatchDecoder(config)
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
        check_pixels(pixel_values, self.vae.config.in_channels, self.config.image_size)
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
    def token_positions(self, token_id: int, input_ids=None, inputs_embeds=None) -> torch.Tensor:
        """(B, L) bool: where the sequence holds `token_id`. From `inputs_embeds` alone, where the embedding equals
        that token's embedding (as transformers' vision-language models find their image placeholders)."""
        if input_ids is not None:
            return input_ids == token_id
        token = self.embed_tokens(torch.tensor(token_id, device=inputs_embeds.device)).to(inputs_embeds.dtype)
        return (inputs_embeds == token).all(-1)

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
    ) -> TransfusionModelOutputWithPast | tuple:
        past_key_values = kwargs.pop("cache", past_key_values)  # transformers ≥ 5.24 keyword
        c = self.config
        output_attentions = c.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = c.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = c.return_dict if return_dict is None else return_dict
        use_cache = c.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False  # recomputed layers would write the cache twice
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        check_ids(c, input_ids, inputs_embeds)
        if pixel_values is not None and image_latents is None:
            image_latents = self.encode_images(pixel_values)

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, L, D)
        slots = self.token_positions(c.image_token_id, input_ids, inputs_embeds)  # (B, L)
        blocks = block_ids_from_slots(slots)
        n_images = check_image_inputs(c, blocks, image_latents, image_timesteps)
        batch, length = inputs_embeds.shape[:2]
        check_attention_mask(attention_mask, batch, past_length + length)
        device = inputs_embeds.device
        temb = skips = None
        if n_images:
            if image_timesteps is None:
                image_timesteps = torch.zeros(n_images, device=device)
            temb = self.time_embed(image_timesteps, inputs_embeds.dtype)  # (N, D)
            image_tokens, skips = self.patch_encoder(image_latents, temb)  # (N, n, D)
            inputs_embeds = inputs_embeds.masked_scatter(slots[..., None], image_tokens.to(inputs_embeds.dtype))

        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if attention_mask is None:
            attention_mask = torch.ones(batch, past_length + length, dtype=torch.long, device=device)
        if position_ids is None:
            # Positions count only attended tokens, so left padding and dropped captions shift nothing.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]

        routing = ModalityRouting(slots) if n_images and c.modality_experts == "mot" else None  # modality experts
        block_sequence_ids = None
        if n_images and c.image_attention == "bidirectional":
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
                output_attentions=output_attentions,
                routing=routing,
            )
            if output_attentions:
                all_attn.append(weights)
        if routing is None:
            hidden_states = self.norm(hidden_states)
        elif routing.image_only:
            hidden_states = self.image_norm(hidden_states)
        else:
            text, image = routing.split(hidden_states)
            hidden_states = routing.merge(self.norm(text), self.image_norm(image))
        if output_hidden_states:
            all_hidden.append(hidden_states)

        image_predictions = None
        if n_images:
            image_hidden = hidden_states[slots].view(n_images, c.image_slots, -1)  # (N, n, D)
            image_predictions = self.patch_decoder(image_hidden, temb, skips)  # (N, C, h, w)

        output = TransfusionModelOutputWithPast(
            last_hidden_state=hidden_states,
            image_predictions=image_predictions,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attn) if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()


class TransfusionForCausalLM(TransfusionPreTrainedModel, GenerationMixin):
    """Transfusion with its text head. `forward` predicts: text logits everywhere, and the diffusion prediction for
    the images at the timesteps it is given (0 = clean); with `labels` it adds the next-token loss. Noise, timestep
    sampling and the diffusion loss belong to `TransfusionDiffusionObjective`."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TransfusionConfig):
        super().__init__(config)
        self.model = TransfusionModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        self.generation_config.eos_token_id = self.text_stop_ids(config)

    @staticmethod
    def text_stop_ids(config: TransfusionConfig) -> list[int]:
        """Where text-only `generate()` stops: at `<|eos|>`, and at `<|boi|>`, where an image begins. Text decoding
        cannot produce the image; `TransfusionPipeline.generate_interleaved` continues past it."""
        eos = [config.eos_token_id] if isinstance(config.eos_token_id, int) else list(config.eos_token_id or [])
        return [*eos, config.boi_token_id]

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

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
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> TransfusionCausalLMOutputWithPast | tuple:
        r"""
        image_latents: (N, C, h, w) the images at the `<|image|>` slots, row-major, as they are (clean, or noised by
            the caller: see `TransfusionDiffusionObjective`); `pixel_values` (N, 3, H, W) in [−1, 1] are encoded first.
        image_timesteps: (N,) their diffusion timesteps (default 0: clean).
        labels: (B, L) next-token targets, −100 where there is no loss (the processor writes them); the loss goes
            through transformers' `loss_function` and so takes its `num_items_in_batch` and `shift_labels`.
        """
        past_key_values = kwargs.pop("cache", past_key_values)  # transformers ≥ 5.24 keyword
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            image_latents=image_latents,
            pixel_values=pixel_values,
            image_timesteps=image_timesteps,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep])  # (B, L or logits_to_keep, V)

        loss = None
        if labels is not None or kwargs.get("shift_labels") is not None:
            c, model = self.config, self.model
            targets = ~(
                model.token_positions(c.image_token_id, input_ids, inputs_embeds)
                | model.token_positions(c.eoi_token_id, input_ids, inputs_embeds)
            )
            if attention_mask is not None:
                targets &= attention_mask[:, -targets.shape[1] :].bool()
            loss = self._lm_loss(logits, labels, targets, **kwargs)

        output = TransfusionCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            image_predictions=outputs.image_predictions,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()

    def _lm_loss(self, logits, labels, text_positions, shift_labels=None, **kwargs):
        """Next-token cross-entropy through `self.loss_function`. Never on a target that is an image slot or the
        `<|eoi|>` closing an image (appended, not predicted), nor on padding: `text_positions` (B, L) marks the
        positions that may be targets."""
        length = text_positions.shape[1]
        check_labels(self.config, "labels", labels, text_positions.shape)
        check_labels(self.config, "shift_labels", shift_labels, text_positions.shape)
        if logits.shape[1] != length:
            raise ValueError(
                f"labels need logits at all {length} positions, got {logits.shape[1]}: call with logits_to_keep=0"
            )
        if shift_labels is None:
            shift_labels = F.pad(labels.masked_fill(~text_positions, -100), (0, 1), value=-100)[:, 1:]
        else:
            shift_labels = shift_labels.masked_fill(~F.pad(text_positions[:, 1:], (0, 1), value=False), -100)
        if kwargs.get("num_items_in_batch") is None and not (shift_labels != -100).any():
            return logits.sum() * 0.0  # no target in the batch: a zero loss that keeps the graph, not NaN
        return self.loss_function(
            logits=logits,
            labels=None,
            vocab_size=self.config.vocab_size,
            shift_labels=shift_labels.contiguous(),
            **kwargs,
        )

    # -- generation ----------------------------------------------------------------------------------------------
    def prepare_inputs_for_generation(
        self,
        input_ids,
        past_key_values=None,
        attention_mask=None,
        inputs_embeds=None,
        image_latents=None,
        pixel_values=None,
        image_timesteps=None,
        **kwargs,
    ):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        # Images enter with the prompt (the prefill, by ids or embeddings); later steps feed single text tokens and read
        # the images from the cache.
        step_ids = model_inputs.get("input_ids")
        prefill = model_inputs.get("inputs_embeds") is not None
        if prefill or (step_ids is not None and (step_ids == self.config.image_token_id).any()):
            model_inputs.update(image_latents=image_latents, pixel_values=pixel_values, image_timesteps=image_timesteps)
        return model_inputs


_NO_RECORD = object()  # a model built in memory has no `_weight_conversions`


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
