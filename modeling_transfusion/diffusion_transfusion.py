"""The Transfusion training objective: L = L_LM + λ·L_diffusion, with everything that touches noise.

The model predicts (ε, v, x0 or a flow velocity) for the noisy latents and timesteps it is given and knows nothing of
noise; this object owns it, as DiT keeps `diffusion/` apart from its network:

- timestep sampling, with the noise limit for images that come before their caption (image→caption rows);
- noising through the diffusers scheduler's own convention (`add_noise`, `get_velocity`), the same configuration that
  samples at inference (`config.scheduler_config()`), so training targets and `scheduler.step` cannot drift apart;
  flow matching interpolates as `FlowMatchEulerDiscreteScheduler` does (x_σ = (1 − σ)·x0 + σ·ε, σ = t / T);
- caption dropout for classifier-free guidance;
- input images (an edit's source, a user's picture in a conversation: `image_is_input`) stay clean at t = 0 and
  carry no diffusion loss, as the pipeline feeds them at inference.

    objective = TransfusionDiffusionObjective(model.config)
    out = objective(model, input_ids=..., attention_mask=..., labels=..., image_latents=clean_latents)
    out.loss.backward()

Random draws come from `generator` (or torch's global generator), in a fixed order: timesteps, noise, caption dropout.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from transformers.modeling_outputs import ModelOutput

from .configuration_transfusion import TransfusionConfig


def image_follows_text(config: TransfusionConfig, input_ids, attention_mask, block_ids) -> torch.Tensor:
    """(N,) bool: the image has text after it in its row, i.e. it comes before its caption (noise limiting)."""
    c = config
    eos = [c.eos_token_id] if isinstance(c.eos_token_id, int) else list(c.eos_token_id or [])
    structural = [
        t for t in (c.bos_token_id, c.pad_token_id, c.boi_token_id, c.eoi_token_id, c.image_token_id) if t is not None
    ]
    is_text = ~torch.isin(input_ids, torch.tensor(structural + eos, device=input_ids.device)) & attention_mask.bool()
    text_after = is_text.flip(-1).long().cumsum(-1).flip(-1) > 0  # (B, L): text at or after this position
    last_slot = (block_ids >= 0) & (F.pad(block_ids, (0, 1), value=-1)[:, 1:] != block_ids)  # one per image, row-major
    return text_after[last_slot]


@dataclass
class TransfusionObjectiveOutput(ModelOutput):
    """
    loss: lm_loss + diffusion_loss_weight · diffusion_loss. lm_loss: next-token cross-entropy (mean over targets, or
    sum / num_items_in_batch). diffusion_loss: MSE of the image predictions against the target (None without images).
    image_timesteps: (N,) the drawn timesteps. outputs: the model's own output.
    """

    loss: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    diffusion_loss: torch.FloatTensor | None = None
    image_timesteps: torch.Tensor | None = None
    outputs: ModelOutput | None = None


class TransfusionDiffusionObjective:
    """The training objective of a Transfusion model of `config`; `scheduler` defaults to the one the config states."""

    def __init__(self, config: TransfusionConfig, scheduler=None):
        self.config = config
        if scheduler is None and config.diffusion_type != "flow_matching":
            scheduler = DDPMScheduler.from_config(config.scheduler_config())
        self.scheduler = scheduler  # None for flow matching: the interpolation is closed form

    # -- the three random draws ------------------------------------------------------------------------------------
    def sample_timesteps(self, image_first: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(N,) timesteps: uniform over [0, T), over [0, noise_limit_timestep) where `image_first` (image→caption)."""
        c, device = self.config, image_first.device
        upper = torch.full(image_first.shape, float(c.num_train_timesteps), device=device)
        if c.noise_limit_timestep is not None:
            upper = torch.where(image_first, torch.full_like(upper, c.noise_limit_timestep), upper)
        u = torch.rand(image_first.shape, device=device, generator=generator)
        if c.diffusion_type == "flow_matching":
            return u * upper  # continuous σ·T
        return (u * upper).long().clamp(max=c.num_train_timesteps - 1)

    def add_noise(self, latents, noise, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
        """Noisy latents and the regression target at `timesteps`, in the sampling scheduler's convention."""
        c = self.config
        if c.diffusion_type == "flow_matching":
            sigma = (timesteps.float() / c.num_train_timesteps).view(-1, 1, 1, 1)
            return (1 - sigma) * latents + sigma * noise, noise - latents
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if c.prediction_type == "epsilon":
            return noisy, noise
        if c.prediction_type == "v_prediction":
            return noisy, self.scheduler.get_velocity(latents, noise, timesteps)
        return noisy, latents

    def drop_captions(self, input_ids, attention_mask, labels, block_ids, generator=None, image_is_input=None):
        """Caption dropout: in a row whose first generated image follows text, with probability `caption_drop_prob`
        hide that text (attention mask 0, so positions shift as if it were absent) and take the LM loss off the row,
        since an unconditional row `<|bos|><|boi|>…` looks like a captioning prompt and must not teach the model to
        stop there. Input images before it stay: an edit's unconditional row is its source image alone (the
        image-conditioned row of InstructPix2Pix guidance)."""
        c = self.config
        generated = block_ids >= 0
        if image_is_input is not None and image_is_input.any():
            per_row = (block_ids.max(-1).values + 1).clamp(min=0)  # (B,) images of each row
            first = per_row.cumsum(0) - per_row  # (B,) row-major index of each row's first image
            index = torch.where(generated, block_ids + first[:, None], torch.zeros_like(block_ids))
            generated = generated & ~image_is_input.bool().to(block_ids.device)[index]
        first_image = generated.float().argmax(-1)  # (B,) first generated slot position (0 if none)
        has_image = generated.any(-1)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        before = positions[None] < (first_image[:, None] - 1)  # strictly before <|boi|>
        text = ~torch.isin(input_ids, torch.tensor([c.bos_token_id, c.boi_token_id, c.eoi_token_id, c.image_token_id],
                                                    device=input_ids.device))  # fmt: skip
        caption = before & text & attention_mask.bool()
        u = torch.rand(input_ids.shape[0], device=input_ids.device, generator=generator)
        drop = has_image & caption.any(-1) & (u < c.caption_drop_prob)
        if not drop.any():
            return attention_mask, labels
        return attention_mask.masked_fill(caption & drop[:, None], 0), labels.masked_fill(drop[:, None], -100)

    # -- one training forward --------------------------------------------------------------------------------------
    def __call__(
        self,
        model,
        input_ids: torch.LongTensor,
        labels: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        image_latents: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_timesteps: torch.Tensor | None = None,
        image_is_input: torch.Tensor | None = None,
        drop_captions: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        num_images_in_batch: int | torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        **model_kwargs,
    ) -> TransfusionObjectiveOutput:
        """Noise the clean `image_latents` (or the latents of `pixel_values`), run `model`, return both losses.

        `image_timesteps` fixes the timesteps instead of drawing them; `image_is_input` (N,) marks the images given
        as inputs (clean, t = 0, no loss; see the module docstring); `drop_captions` defaults to `model.training`;
        `num_items_in_batch` is the count of LM targets across all parts of a (micro-)batch, so losses of parts add up
        to the batch mean (transformers' `loss_function` convention); `num_images_in_batch` likewise counts the
        generated images of all parts, so their diffusion losses add up to the batch's mean over images."""
        from .modeling_transfusion import image_block_ids

        c = self.config
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if pixel_values is not None and image_latents is None:
            image_latents = model.encode_images(pixel_values)
        target = None
        if image_latents is not None and image_latents.shape[0]:
            blocks = image_block_ids(input_ids, c.image_token_id)
            if image_timesteps is None:
                image_first = image_follows_text(c, input_ids, attention_mask, blocks)
                image_timesteps = self.sample_timesteps(image_first.to(input_ids.device), generator)
            noise = torch.randn(
                image_latents.shape, generator=generator, device=image_latents.device, dtype=image_latents.dtype
            )
            clean = image_latents
            image_latents, target = self.add_noise(image_latents, noise, image_timesteps)
            if image_is_input is not None and image_is_input.any():
                generated = ~image_is_input.bool().to(image_latents.device)
                keep = generated.view(-1, *([1] * (clean.ndim - 1)))
                image_latents = torch.where(keep, image_latents, clean)  # inputs exactly as the pipeline feeds them
                image_timesteps = torch.where(generated, image_timesteps, torch.zeros_like(image_timesteps))
            drop = model.training if drop_captions is None else drop_captions
            if drop and c.caption_drop_prob > 0 and "position_ids" not in model_kwargs:
                attention_mask, labels = self.drop_captions(input_ids, attention_mask, labels, blocks, generator,
                                                            image_is_input)  # fmt: skip
        else:
            image_latents = None
        outputs = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            image_latents=image_latents,
            image_timesteps=image_timesteps,
            num_items_in_batch=num_items_in_batch,
            return_dict=True,
            **model_kwargs,
        )
        lm_loss = outputs.loss
        loss, diffusion_loss = lm_loss, None
        if target is not None and image_is_input is not None:
            generated = ~image_is_input.bool().to(target.device)
            predictions, target = outputs.image_predictions[generated], target[generated]
            target = target if len(target) else None  # every image an input: no diffusion loss
        elif target is not None:
            predictions = outputs.image_predictions
        if target is not None:
            diffusion_loss = F.mse_loss(predictions.float(), target.float())
            if num_images_in_batch is not None:  # this part's share of the batch mean
                diffusion_loss = diffusion_loss * (len(target) / num_images_in_batch)
            loss = lm_loss + c.diffusion_loss_weight * diffusion_loss
        return TransfusionObjectiveOutput(
            loss=loss, lm_loss=lm_loss, diffusion_loss=diffusion_loss, image_timesteps=image_timesteps, outputs=outputs
        )


__all__ = ["TransfusionDiffusionObjective", "TransfusionObjectiveOutput", "image_follows_text"]
