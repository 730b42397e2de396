"""The image path of Transfusion: latent patches in and out of the transformer, and the diffusion timestep embedding.

Shape legend (as in modeling_transfusion.py)
    N  images in the call             D  hidden size                  C  latent channels
    h×w latent height × width         p  patch size                   n  image slots per image = (h/p)·(w/p)
    P  patch vector C·p·p

Two interchangeable pairs, chosen by `config.patch_encoder`: a linear layer each way (the paper's large-scale choice)
or U-Net down/up blocks around the transformer with skip connections (the paper's choice at small scale). Encoders
map (N, C, h, w) latents to (N, n, D) slot embeddings; decoders map (N, n, D) hidden states back to (N, C, h, w).
"""

import torch
import torch.nn.functional as F
from diffusers.models.downsampling import Downsample2D
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from .configuration_transfusion import TransfusionConfig

def patchify(latents: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, h, w) → (N, n, P), patches in row-major order."""
    n_img, channels, height, width = latents.shape
    p = patch_size
    x = latents.reshape(n_img, channels, height // p, p, width // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n_img, (height // p) * (width // p), channels * p * p)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int, height: int, width: int) -> torch.Tensor:
    """(N, n, P) → (N, C, h, w); the inverse of `patchify`."""
    p = patch_size
    x = patches.reshape(patches.shape[0], height // p, width // p, channels, p, p)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(patches.shape[0], channels, height, width)


class TransfusionTimestepEmbedder(nn.Module):
    """Diffusion timestep → (N, D): a sinusoid and a two-layer MLP (diffusers' building blocks, as in DiT)."""

    def __init__(self, config: TransfusionConfig):
        super().__init__()
        self.sinusoid = Timesteps(config.timestep_embed_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.mlp = TimestepEmbedding(config.timestep_embed_dim, config.hidden_size)

    def forward(self, timesteps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(self.sinusoid(timesteps).to(dtype))


class LinearPatchEncoder(nn.Module):
    """Patch vectors → D with one linear layer; the timestep embedding is added to every patch (the paper's)."""

    def __init__(self, config: TransfusionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.proj = nn.Linear(config.patch_dim, config.hidden_size)

    def forward(self, latents: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        tokens = self.proj(patchify(latents, self.patch_size).to(self.proj.weight.dtype))  # (N, n, D)
        return tokens + temb[:, None, :], ()


class LinearPatchDecoder(nn.Module):
    """D → patch vectors with a zero-initialised linear layer, so a fresh model predicts 0."""

    def __init__(self, config: TransfusionConfig):
        super().__init__()
        self.config = config
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.proj_out = nn.Linear(config.hidden_size, config.patch_dim)
        self.proj_out._zero_init = True

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, skips: tuple) -> torch.Tensor:
        c = self.config
        patches = self.proj_out(self.norm(hidden_states))  # (N, n, P)
        return unpatchify(patches, c.patch_size, c.latent_channels, c.latent_size, c.latent_size)


class UNetPatchEncoder(nn.Module):
    """U-Net down blocks (diffusers ResNet blocks conditioned on the timestep): (N, C, h, w) → (N, n, D).

    One level per factor two of the patch size; the activations before each downsampling are kept as skips for the
    decoder, as in a U-Net whose middle is the transformer.
    """

    def __init__(self, config: TransfusionConfig):
        super().__init__()
        channels, groups, temb = config.unet_block_out_channels, config.unet_norm_groups, config.hidden_size
        self.conv_in = nn.Conv2d(config.latent_channels, channels[0], kernel_size=3, padding=1)
        self.resnets = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        for i, out_ch in enumerate(channels):
            in_ch = channels[max(i - 1, 0)]
            self.resnets.append(
                ResnetBlock2D(in_channels=in_ch, out_channels=out_ch, temb_channels=temb, groups=groups)
            )
            if i < len(channels) - 1:
                self.downsamplers.append(Downsample2D(out_ch, use_conv=True, name="op"))
        self.proj_out = nn.Conv2d(channels[-1], config.hidden_size, kernel_size=1)

    def forward(self, latents: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        x = self.conv_in(latents.to(self.conv_in.weight.dtype))  # (N, c0, h, w)
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            skips.append(x)
            if i < len(self.downsamplers):
                x = self.downsamplers[i](x)
        x = self.proj_out(x)  # (N, D, h/p, w/p)
        return x.flatten(2).transpose(1, 2), tuple(skips)  # (N, n, D)


class UNetPatchDecoder(nn.Module):
    """U-Net up blocks: (N, n, D) → (N, C, h, w), with the encoder's skips; the output conv is zero-initialised."""

    def __init__(self, config: TransfusionConfig):
        super().__init__()
        self.config = config
        channels, groups, temb = config.unet_block_out_channels, config.unet_norm_groups, config.hidden_size
        self.proj_in = nn.Conv2d(config.hidden_size, channels[-1], kernel_size=1)
        self.resnets = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for i in reversed(range(len(channels))):
            out_ch = channels[max(i - 1, 0)]
            self.resnets.append(
                ResnetBlock2D(in_channels=2 * channels[i], out_channels=out_ch, temb_channels=temb, groups=groups)
            )
            if i > 0:
                self.upsamplers.append(Upsample2D(out_ch, use_conv=True))
        self.norm_out = nn.GroupNorm(groups, channels[0], eps=1e-6)
        self.conv_out = nn.Conv2d(channels[0], config.latent_channels, kernel_size=3, padding=1)
        self.conv_out._zero_init = True

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, skips: tuple) -> torch.Tensor:
        side = self.config.latent_size // self.config.patch_size
        x = hidden_states.transpose(1, 2).reshape(hidden_states.shape[0], -1, side, side)  # (N, D, h/p, w/p)
        x = self.proj_in(x)
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips[-1 - i]], dim=1), temb)
            if i < len(self.upsamplers):
                x = self.upsamplers[i](x)
        return self.conv_out(F.silu(self.norm_out(x)))  # (N, C, h, w)
