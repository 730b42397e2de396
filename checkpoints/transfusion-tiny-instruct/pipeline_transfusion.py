"""TransfusionPipeline: text→image, editing, image→text, chat and interleaved generation with one Transfusion model.

The pipeline only orchestrates. Its `transformer` component *is* the transformers `TransfusionForCausalLM` (which owns
the VAE, the patch layers and the cache helper); its processor (built from the tokenizer and the model config) owns
the sequence layout, special ids, padding and pixel preprocessing. This file ships with the model code and imports
its neighbours relatively, so it also loads as remote code next to a saved checkpoint.

Sampling, in named steps used by every path:
  `prefill`       the prompt prefix runs once and fills a KV cache (for guidance: conditional and unconditional rows);
  `denoise`       each scheduler step runs only the image slots against that cache and crops the cache back;
  `append_image`  the finished latent runs once more at t = 0, so text generated afterwards attends to the clean image.
"""

import inspect
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import DynamicCache
from transformers.dynamic_module_utils import get_relative_import_files

from .checks_transfusion import (
    MAX_IMAGES_PER_CALL,
    MAX_INFERENCE_STEPS,
    _is_integer,
    check_generator,
    check_image_size,
    check_integer,
    check_latents,
    check_number,
    check_pipeline_folder,
    check_row_lengths,
)
from .lora_transfusion import TransfusionLoraLoaderMixin
from .processing_transfusion import TransfusionProcessor, is_conversation

MODEL_SUBFOLDER = "transformer"
# The code that travels with a checkpoint: this file, the model and the processor, and everything they import
# relatively. One list, copied to the folder root (for diffusers) and to the model folder (for transformers).
_HERE = Path(__file__).resolve()
CODE_ENTRY_FILES = ("pipeline_transfusion.py", "modeling_transfusion.py", "processing_transfusion.py")


def shipped_code_files(folder: Path = _HERE.parent) -> list[Path]:
    """The code files of `folder` that a saved checkpoint carries (the entry files and their relative imports)."""
    files = set()
    for name in CODE_ENTRY_FILES:
        files |= {Path(f).resolve() for f in [folder / name, *get_relative_import_files(str(folder / name))]}
    return sorted(files)


def save_code(save_directory) -> list[Path]:
    """Copy the shipped code files into a saved pipeline folder: its root and its model subfolder."""
    root = Path(save_directory)
    written = []
    for target in (root, root / MODEL_SUBFOLDER):
        target.mkdir(parents=True, exist_ok=True)
        for source in shipped_code_files():
            if source != (target / source.name).resolve():
                shutil.copyfile(source, target / source.name)
            written.append(target / source.name)
    return written


@dataclass
class TransfusionPipelineOutput(BaseOutput):
    """images: PIL images, a numpy array (N, H, W, 3), a tensor (N, 3, H, W) or latents (N, C, h, w)."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None = None


@dataclass
class InterleavedOutput(BaseOutput):
    """items: the generated text pieces and images in order (one list per prompt when a batch was given).
    token_ids: the whole sequence of each prompt (a (1, L) tensor, or a list of them for a batch)."""

    items: list | None = None
    token_ids: torch.Tensor | list | None = None


@dataclass
class ChatOutput(BaseOutput):
    """message: the assistant's turn, `{"role": "assistant", "content": [text and images in order]}` (append it to
    the conversation to go on); a list of them for a batch of conversations. token_ids: as `InterleavedOutput`."""

    message: dict | list | None = None
    token_ids: torch.Tensor | list | None = None


@dataclass
class Prefix:
    """A cached prefix: the KV cache of `rows` sequences and their attention mask (B, L) over the cached positions."""

    cache: DynamicCache
    mask: torch.Tensor


class TransfusionPipeline(DiffusionPipeline, TransfusionLoraLoaderMixin):
    r"""
    Text→image and instruction editing (`__call__`, with `image=` the picture to edit) with a Transfusion model, plus
    captioning (`caption`), conversations (`chat`) and interleaved text+image generation (`generate_interleaved`) with
    the same model.

    Components:
        transformer: `TransfusionForCausalLM` (holds the VAE: `pipe.vae is pipe.transformer.vae`).
        scheduler: any diffusers scheduler for the model's prediction type (DDPM, DDIM, PNDM, LMS, Euler, Heun,
            DPM-Solver, UniPC, … for ε-prediction; `FlowMatchEulerDiscreteScheduler` for flow matching).
        tokenizer: the model's tokenizer (with `<|bos|> <|eos|> <|pad|> <|boi|> <|eoi|> <|image|>`).
        default_inference_steps: the step count `__call__` uses when given none (saved in model_index.json).
    """

    model_cpu_offload_seq = "transformer"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, transformer, scheduler, tokenizer, default_inference_steps: int | None = None):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, tokenizer=tokenizer)
        self.register_to_config(default_inference_steps=default_inference_steps)
        self.processor = TransfusionProcessor.from_model_config(tokenizer, transformer.config)

    @property
    def vae(self):
        return self.transformer.vae

    @property
    def image_size(self) -> int:
        return self.transformer.config.image_size

    # the state a step callback reads and may change (diffusers' convention, e.g. its CFG-cutoff callbacks)
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def image_guidance_scale(self) -> float:
        return self._image_guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0 or self._image_guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    # -- inputs --------------------------------------------------------------------------------------------------------
    def check_inputs(self, prompt, negative_prompt, height, width, num_inference_steps, guidance_scale, latents, n,
                     generator, output_type, callback_on_step_end, callback_on_step_end_tensor_inputs, image=None,
                     image_guidance_scale=None):  # fmt: skip
        """Every argument of `__call__`, before any work; returns the prompts, negative prompts and images to edit
        (None without `image`) as lists, one per prompt."""
        c = self.transformer.config
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a non-empty string or list of strings, got {prompt!r}")
        negatives = None
        if negative_prompt is not None:
            negatives = [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
            if not isinstance(negatives, list) or len(negatives) not in (1, len(prompts)) or not all(
                    isinstance(p, str) for p in negatives):  # fmt: skip
                raise ValueError(
                    f"negative_prompt must be a string or a list of {len(prompts)} strings, got {negative_prompt!r}"
                )
            negatives = negatives * (len(prompts) // len(negatives))  # one per prompt
        for name, value in (("height", height), ("width", width)):
            check_image_size(name, value, self.image_size, c.vae_downsample * c.patch_size)
        check_integer("num_inference_steps", num_inference_steps, 1, MAX_INFERENCE_STEPS)
        check_number("guidance_scale", guidance_scale, note=" (1 or less = no guidance)")
        most = MAX_IMAGES_PER_CALL
        check_integer(
            "num_images_per_prompt", n, 1, most, note=" (call again for more)" * (_is_integer(n) and n > most)
        )
        if len(prompts) * n > most:
            raise ValueError(f"{len(prompts)} prompts × num_images_per_prompt={n} = {len(prompts) * n} images: "
                             f"one call makes at most {most}; call again for more")  # fmt: skip
        check_generator(generator, len(prompts) * n)
        check_latents(latents, (len(prompts) * n, c.latent_channels, c.latent_size, c.latent_size))
        self._check_output_type(output_type)
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise ValueError(
                "callback_on_step_end must be callable (pipe, step, timestep, tensors) → dict, "
                f"got {callback_on_step_end!r}"
            )
        bad = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs {sorted(bad)} not in {self._callback_tensor_inputs}")
        images = None if image is None else self._check_images(image, len(prompts))
        if image_guidance_scale is not None:
            check_number("image_guidance_scale", image_guidance_scale, note=" (1 or less = none; needs image=)")
            if image is None and image_guidance_scale > 1:
                raise ValueError(f"image_guidance_scale={image_guidance_scale} guides towards the image to edit: pass "
                                 "image= (or leave image_guidance_scale None)")  # fmt: skip
        for name, texts in (("prompt", prompts), ("negative_prompt", negatives or [])):
            rows = [[t] for t in texts] if images is None else [self._edit_row(i, t) for i, t in zip(images, texts)]
            encoded = self.processor(rows, append_boi=True) if rows else None
            self._check_lengths(name, encoded, c.image_slots)
        return prompts, negatives, images

    @staticmethod
    def _check_images(image, n_prompts: int) -> list:
        """`image=`: one image for every prompt, or one per prompt (a list, or a (N, 3, H, W) tensor in [−1, 1])."""
        if isinstance(image, torch.Tensor) and image.ndim == 4:
            image = list(image)
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        kinds = [type(i).__name__ for i in images]
        if not images or not all(isinstance(i, (PIL.Image.Image, np.ndarray, torch.Tensor)) for i in images):
            raise ValueError("image must be a PIL image, a uint8 array, a (3, H, W) tensor in [-1, 1], or a list of "
                             f"them (one per prompt), got {kinds or image!r}")  # fmt: skip
        if len(images) not in (1, n_prompts):
            raise ValueError(f"image: {len(images)} images for {n_prompts} prompts; give one image, or one per prompt")
        return images * (n_prompts // len(images))

    @staticmethod
    def _edit_row(image, instruction: str | None) -> list:
        """The processor row of an edit: the user's turn with the image and the instruction, the answer to come (an
        empty instruction: the image alone, as caption dropout leaves it in training)."""
        if not instruction:
            return [image]
        return [{"role": "user", "content": [image, instruction]}]

    @staticmethod
    def _check_output_type(output_type):
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be one of 'pil', 'np', 'pt', 'latent', got {output_type!r}")

    def _check_lengths(self, name, encoded, reserve=0):
        """Every row of the processor's `encoded` output fits the model's positions with `reserve` to spare."""
        if encoded is not None:
            positions = self.transformer.config.max_position_embeddings
            check_row_lengths(name, encoded["attention_mask"].sum(1), positions, reserve)

    def encode_prompt(self, prompts: list[str], negative_prompts: list[str] | None, do_cfg: bool):
        """The processor's generation rows `<|bos|> prompt <|boi|>` (then the unconditional/negative rows when
        guiding), left-padded: (ids, attention mask)."""
        rows = prompts + ((negative_prompts or [""] * len(prompts)) if do_cfg else [])
        enc = self.processor([[text] for text in rows], append_boi=True, padding_side="left")
        return enc["input_ids"].to(self._execution_device), enc["attention_mask"].to(self._execution_device)

    def encode_edit(self, prompts: list[str], negative_prompts: list[str] | None, images: list, text_cfg: bool,
                    image_cfg: bool):  # fmt: skip
        """The rows of an edit, left-padded: the conditional rows (image, instruction), then when guiding the rows
        without the instruction (the image alone, or image and negative prompt), then with `image_cfg` the rows with
        neither (`<|bos|> <|boi|>`). Returns (ids, attention mask, clean latents of the rows' images)."""
        rows = [self._edit_row(i, t) for i, t in zip(images, prompts)]
        if text_cfg or image_cfg:
            rows += [self._edit_row(i, t) for i, t in zip(images, negative_prompts or [""] * len(prompts))]
        if image_cfg:
            rows += [[""]] * len(prompts)
        enc = self.processor(rows, append_boi=True, padding_side="left").to(self._execution_device)
        latents = self.transformer.encode_images(enc["pixel_values"].to(self.transformer.dtype))
        return enc["input_ids"], enc["attention_mask"], latents

    def prepare_latents(self, batch_size, dtype, generator, latents=None):
        """Initial noise scaled by the scheduler's `init_noise_sigma` — read after `set_timesteps`, which sets it for
        sigma-based schedulers (Euler, Heun, LMS, KDPM2)."""
        c = self.transformer.config
        shape = (batch_size, c.latent_channels, c.latent_size, c.latent_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=dtype)
        latents = latents.to(device=self._execution_device, dtype=dtype)
        return latents * getattr(self.scheduler, "init_noise_sigma", 1.0)  # flow matching has none

    def prepare_extra_step_kwargs(self, generator, eta=0.0):
        """Only the `scheduler.step` arguments this scheduler takes (PNDM, LMS, Heun, UniPC, … take no generator)."""
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        extra = {"eta": eta} if "eta" in accepted else {}
        if "generator" in accepted:
            extra["generator"] = generator
        return extra

    # -- sampling in named steps -----------------------------------------------------------------------------------
    def prefill(self, input_ids, attention_mask, image_latents=None, prefix: Prefix | None = None) -> Prefix:
        """Run `input_ids` (B, L) into a new cache, or after the cached `prefix`; returns the extended prefix."""
        cache = prefix.cache if prefix is not None else DynamicCache(config=self.transformer.config)
        mask = attention_mask if prefix is None else torch.cat([prefix.mask, attention_mask], dim=1)
        self.transformer(input_ids=input_ids, attention_mask=mask, image_latents=image_latents, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)  # fmt: skip
        return Prefix(cache, mask)

    def _image_slots(self, rows: int, device) -> torch.Tensor:
        return torch.tensor([self.processor.image_slot_ids] * rows, device=device)  # (rows, image_slots)

    def _predict(self, prefixes: list[Prefix], latents, t) -> torch.Tensor:
        """The model's image prediction for `latents` at `t` after each cached prefix; every cache is cropped back."""
        predictions, start = [], 0
        for prefix in prefixes:
            rows = prefix.mask.shape[0]
            slots = self._image_slots(rows, latents.device)
            length = prefix.cache.get_seq_length()
            out = self.transformer(
                input_ids=slots,
                attention_mask=torch.cat([prefix.mask, torch.ones_like(slots)], dim=1),
                past_key_values=prefix.cache,
                use_cache=True,
                image_latents=latents[start : start + rows],
                image_timesteps=t.reshape(1).expand(rows).to(latents.device),
                logits_to_keep=1,
            )
            self.transformer.crop_cache(prefix.cache, length)  # the next step sees the prefix only
            predictions.append(out.image_predictions)
            start += rows
        return torch.cat(predictions)

    @torch.no_grad()
    def denoise(self, prefixes: list[Prefix], latents, timesteps, generator=None, callback_on_step_end=None,
                callback_on_step_end_tensor_inputs=("latents",)):  # fmt: skip
        """The one denoising loop. `prefixes` hold B conditional rows, then (when guiding) B unconditional rows, and
        for InstructPix2Pix guidance B rows with no conditioning — in one prefix or several (see `guide`). A callback
        that lowers the guidance scales to ≤ 1 drops the unconditional rows from then on."""
        batch = latents.shape[0]
        extra = self.prepare_extra_step_kwargs(generator)
        warmup = len(timesteps) - self._num_inference_steps * self.scheduler.order
        with self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                if not self.do_classifier_free_guidance and sum(p.mask.shape[0] for p in prefixes) > batch:
                    prefixes = _conditional_rows(prefixes, batch)
                groups = sum(p.mask.shape[0] for p in prefixes) // batch
                latent_in = torch.cat([latents] * groups)
                if hasattr(self.scheduler, "scale_model_input"):  # flow matching has none
                    latent_in = self.scheduler.scale_model_input(latent_in, t)
                prediction = self.guide(self._predict(prefixes, latent_in, t).to(latents.dtype).chunk(groups))
                latents = self.scheduler.step(prediction, t, latents, **extra, return_dict=False)[0]
                if callback_on_step_end is not None:
                    local = {"latents": latents}
                    tensors = {k: local[k] for k in callback_on_step_end_tensor_inputs}
                    outputs = callback_on_step_end(self, i, t, tensors)
                    latents = outputs.pop("latents", latents)
                if i == len(timesteps) - 1 or ((i + 1) > warmup and (i + 1) % self.scheduler.order == 0):
                    progress.update()
        return latents

    def guide(self, predictions: tuple) -> torch.Tensor:
        """Classifier-free guidance over the row groups' predictions: (conditional,) unguided; (conditional, u) as
        u + s·(c − u), u the rows without the prompt; (c, i, n) as InstructPix2Pix, n + s_I·(i − n) + s·(c − i), i the
        rows with the image to edit but no instruction, n the rows with neither."""
        if len(predictions) == 1:
            return predictions[0]
        if len(predictions) == 2:
            cond, uncond = predictions
            return uncond + self.guidance_scale * (cond - uncond)
        cond, image_only, none = predictions
        return none + self.image_guidance_scale * (image_only - none) + self.guidance_scale * (cond - image_only)

    def append_image(self, prefix: Prefix, latents) -> Prefix:
        """Run the finished latents (B, C, h, w) at t = 0 after the prefix (its B conditional rows), so the cache
        holds the clean image; the `<|eoi|>` that closes it is the next input."""
        slots = self._image_slots(latents.shape[0], latents.device)
        mask = torch.cat([prefix.mask, torch.ones_like(slots)], dim=1)
        self.transformer(input_ids=slots, attention_mask=mask, past_key_values=prefix.cache, use_cache=True,
                         image_latents=latents, image_timesteps=torch.zeros(latents.shape[0], device=latents.device),
                         logits_to_keep=1)  # fmt: skip
        return Prefix(prefix.cache, mask)

    def _start_sampling(self, guidance_scale, num_inference_steps, image_guidance_scale=None):
        """Set the loop state the callbacks read, then the timesteps (before any latents: see prepare_latents)."""
        self._guidance_scale, self._interrupt, self._num_inference_steps = guidance_scale, False, num_inference_steps
        self._image_guidance_scale = 1.0 if image_guidance_scale is None else image_guidance_scale
        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        self._num_timesteps = len(self.scheduler.timesteps)
        return self.scheduler.timesteps

    # -- text → image ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float = 3.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        image=None,
        image_guidance_scale: float | None = None,
    ):
        r"""
        Generate images from text, or edit `image` as the prompt says.

        Args:
            prompt: one prompt or a list (with `image`: the instructions, e.g. "make the circle blue").
            negative_prompt: replaces the empty unconditional prompt of guidance.
            height, width: pixels; must equal the model's image size (default).
            num_inference_steps: scheduler steps; None takes the pipeline's `default_inference_steps`, else 50.
            guidance_scale: classifier-free guidance (1 or less = none).
            num_images_per_prompt, generator (one, or a list with one per image), latents (initial noise).
            output_type: "pil", "np", "pt" or "latent".
            callback_on_step_end(pipe, i, t, {"latents": …}) → dict: may replace the latents, read `pipe.num_timesteps`
                and change `pipe._guidance_scale` (≤ 1, with `_image_guidance_scale` ≤ 1, ends guidance).
            image: the picture(s) to edit — a PIL image, a uint8 array, a (3, H, W) tensor in [−1, 1], or a list or
                (N, 3, H, W) tensor of them, one for every prompt or one per prompt. It goes into the sequence clean
                (t = 0) before the instruction, in the user's turn of a conversation, and the edited image is
                generated as the answer, after the cached prefix.
            image_guidance_scale: with `image`, InstructPix2Pix guidance over both conditionings: the rows without the
                instruction keep the image, and rows with neither are added (three rows per image). None or ≤ 1: the
                unconditional rows drop only the instruction (`guidance_scale` over the text, the image always kept).
        """
        # 1. check inputs
        height = self.image_size if height is None else height
        width = self.image_size if width is None else width
        if num_inference_steps is None:
            num_inference_steps = self.config.get("default_inference_steps") or 50
        prompts, negatives, images = self.check_inputs(prompt, negative_prompt, height, width, num_inference_steps,
                                                       guidance_scale, latents, num_images_per_prompt, generator,
                                                       output_type, callback_on_step_end,
                                                       callback_on_step_end_tensor_inputs, image,
                                                       image_guidance_scale)  # fmt: skip
        n = num_images_per_prompt
        prompts = [p for p in prompts for _ in range(n)]
        negatives = None if negatives is None else [p for p in negatives for _ in range(n)]
        images = None if images is None else [i for i in images for _ in range(n)]
        # 2. timesteps (they set the scheduler's initial noise scale)
        timesteps = self._start_sampling(guidance_scale, num_inference_steps, image_guidance_scale)
        # 3. encode and prefill the prompt (conditional rows, then unconditional rows); an edit's image runs clean
        if images is None:
            ids, mask = self.encode_prompt(prompts, negatives, self.do_classifier_free_guidance)
            prefix = self.prefill(ids, mask)
        else:
            ids, mask, known = self.encode_edit(prompts, negatives, images, self._guidance_scale > 1,
                                                self._image_guidance_scale > 1)  # fmt: skip
            prefix = self.prefill(ids, mask, known)
        # 4. prepare latents
        latents = self.prepare_latents(len(prompts), self.transformer.dtype, generator, latents)
        # 5. the denoising loop
        latents = self.denoise([prefix], latents, timesteps, generator, callback_on_step_end,
                               callback_on_step_end_tensor_inputs)  # fmt: skip
        # 6. decode
        images = latents if output_type == "latent" else self.postprocess(latents, output_type)
        self.maybe_free_model_hooks()
        return TransfusionPipelineOutput(images=images) if return_dict else (images,)

    def postprocess(self, latents: torch.Tensor, output_type: str = "pil"):
        """Latents → images through the model's VAE."""
        pixels = self.transformer.decode_latents(latents)
        return self.processor.postprocess_images(pixels.float(), output_type=output_type)

    # -- image → text ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def caption(self, images, prompt: str | None = None, max_new_tokens: int = 32, do_sample: bool = False,
                **generate_kwargs) -> list[str]:  # fmt: skip
        """Describe one image or a list: the processor's row `<|bos|> image [prompt]`, then decoding with the cache."""
        images = images if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise ValueError("caption() needs at least one image")
        kinds = [type(image).__name__ for image in images]
        if not all(isinstance(image, (PIL.Image.Image, np.ndarray, torch.Tensor)) for image in images):
            raise ValueError(f"images must be PIL images, uint8 arrays or (3, H, W) tensors in [-1, 1], got {kinds}")
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string or None, got {prompt!r}")
        rows = [[image, prompt] if prompt else [image] for image in images]
        enc = self.processor(rows, padding_side="left").to(self._execution_device)
        self._check_lengths("caption row", enc)
        left = self.transformer.config.max_position_embeddings - enc["input_ids"].shape[1]
        check_integer("max_new_tokens", max_new_tokens, 1, left, note=" (the positions left after the image)")
        ids = self.processor.special_ids
        out = self.transformer.generate(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            pixel_values=enc["pixel_values"].to(self.transformer.dtype),
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            eos_token_id=ids["eos"],
            pad_token_id=ids["pad"],
            bad_words_ids=[[ids["boi"]], [ids["image"]]],
            **generate_kwargs,
        )
        new = out[:, enc["input_ids"].shape[1] :]
        return [s.strip() for s in self.processor.batch_decode(new, skip_special_tokens=True)]

    # -- interleaved ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_interleaved(
        self,
        prompt: str | list,
        max_new_tokens: int = 64,
        max_images: int = 4,
        num_inference_steps: int | None = None,
        guidance_scale: float = 3.0,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        callback_on_step_end=None,
        image_guidance_scale: float | None = None,
    ) -> InterleavedOutput:
        """Free decoding with `transformer.generate()` in which the model itself may emit `<|boi|>`: generation stops
        there, the image is denoised after the cache `generate` returned, run clean into that cache, and decoding
        continues from `<|eoi|>` on the clean image. Guidance drops the text, as caption dropout does in training: the
        unconditional row is the row's images so far, clean (`<|bos|><|boi|>` when it has none); with
        `image_guidance_scale` > 1 rows with neither are added (InstructPix2Pix, see `guide`).

        `prompt` is a string, a list of strings and images (one row), a conversation (see `chat`) or a list of rows (a
        batch). The rows go through `generate` together; those that stop at `<|boi|>` get their images as one batch
        and continue, the others are finished. `max_new_tokens` counts the sampled tokens of each row (not the image
        slots).
        """
        batched = isinstance(prompt, list) and not is_conversation(prompt) and any(isinstance(r, list) for r in prompt)
        rows = prompt if batched else [prompt]
        if not isinstance(prompt, (str, list)):
            raise ValueError("prompt must be a string, a list of strings and images (one row) or a list of rows, got "
                             f"{type(prompt).__name__}")  # fmt: skip
        if not rows or any(row == [] or row == "" for row in rows):
            raise ValueError("prompt must not be empty")
        if num_inference_steps is None:
            num_inference_steps = self.config.get("default_inference_steps") or 50
        positions = self.transformer.config.max_position_embeddings
        check_integer("max_new_tokens", max_new_tokens, 1, positions)
        check_integer("max_images", max_images, 0)
        check_integer("num_inference_steps", num_inference_steps, 1, MAX_INFERENCE_STEPS)
        check_number("guidance_scale", guidance_scale, note=" (1 or less = no guidance)")
        check_number("temperature", temperature, note=" (0 = greedy)")
        if image_guidance_scale is not None:
            check_number("image_guidance_scale", image_guidance_scale, note=" (1 or less = none)")
        check_generator(generator, len(rows), allow_list=False)
        self._check_output_type(output_type)
        model, ids, device = self.transformer, self.processor.special_ids, self._execution_device
        enc = self.processor(rows if batched else rows[0], padding_side="left").to(device)
        self._check_lengths("prompt row", enc)
        known = model.encode_images(enc["pixel_values"].to(model.dtype)) if "pixel_values" in enc else None
        per_row = (enc["input_ids"] == ids["boi"]).sum(1).tolist()
        row_images = [list(known[sum(per_row[:i]) : sum(per_row[: i + 1])]) if known is not None else []
                      for i in range(len(rows))]  # every row's clean latents so far, for its unconditional row
        # the prompt runs through generate's first step; keep the last token uncached, as generate expects
        prefix = self.prefill(enc["input_ids"][:, :-1], enc["attention_mask"][:, :-1], known)
        sequence, mask = enc["input_ids"], enc["attention_mask"]  # (B, L): every token so far, cached or not
        active = torch.arange(len(rows), device=device)  # the rows still generating
        sequences, items = [None] * len(rows), [[] for _ in rows]
        budget = torch.full((len(rows),), max_new_tokens, device=device)
        seed = None if generator is None else int(torch.randint(2**62, (1,), generator=generator))
        for n_images in range(max_images + 1):
            # no more images: <|boi|> banned, and not a stop token (generate never bans its own stop tokens)
            last_round = n_images == max_images
            banned = [[ids["image"]], [ids["eoi"]]] + ([[ids["boi"]]] if last_round else [])
            stop_ids = [ids["eos"]] if last_round else [ids["eos"], ids["boi"]]
            with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
                if seed is not None:
                    torch.manual_seed(seed + n_images)
                out = model.generate(input_ids=sequence, attention_mask=mask, past_key_values=prefix.cache,
                                     max_new_tokens=int(budget[active].max()), do_sample=temperature > 0,
                                     temperature=temperature if temperature > 0 else None,
                                     eos_token_id=stop_ids, pad_token_id=ids["pad"],
                                     bad_words_ids=banned, return_dict_in_generate=True)  # fmt: skip
            new = out.sequences[:, sequence.shape[1] :]  # (B, n): finished rows are padded after their stop token
            stops = (new == ids["eos"]) | (new == ids["boi"])
            used = torch.where(stops.any(1), stops.int().argmax(1) + 1, new.shape[1])  # tokens each row sampled
            used = torch.minimum(used, budget[active])
            keep = torch.arange(new.shape[1], device=device)[None] < used[:, None]  # (B, n)
            budget[active] -= used
            wants_image = (new.gather(1, (used - 1).clamp(min=0)[:, None])[:, 0] == ids["boi"]) & (used > 0)
            sequence, mask = out.sequences, torch.cat([mask, keep.long()], dim=1)
            # every row's last real token (its <|boi|>) into the cache: the cache holds all but generate's last column
            prefix = Prefix(out.past_key_values, mask[:, :-1])
            prefix = self.prefill(sequence[:, -1:], mask[:, -1:], prefix=prefix)
            for j, row in enumerate(active.tolist()):
                text = new[j][keep[j]]
                if len(text) and text[-1] in (ids["boi"], ids["eos"]):
                    text = text[:-1]
                if len(text):
                    items[row].append(self.processor.decode(text))
                if not wants_image[j]:
                    sequences[row] = sequence[j][mask[j].bool()][None]
            if not wants_image.any():
                break
            pick = wants_image.nonzero()[:, 0]
            active, sequence, mask = active[pick], sequence[pick], mask[pick]
            prefix.cache.batch_select_indices(pick)
            prefix = Prefix(prefix.cache, mask)
            latents = self._interleaved_image(prefix, [row_images[r] for r in active.tolist()], num_inference_steps,
                                              guidance_scale, image_guidance_scale, generator,
                                              callback_on_step_end)  # fmt: skip
            images = latents if output_type == "latent" else self.postprocess(latents, output_type)
            for j, row in enumerate(active.tolist()):
                items[row].append(images[j : j + 1] if output_type == "latent" else images[j])
                row_images[row].append(latents[j])
            prefix = self.append_image(prefix, latents)
            closing = torch.tensor([[*self.processor.image_slot_ids, ids["eoi"]]] * len(pick), device=device)
            sequence, mask = torch.cat([sequence, closing], dim=1), torch.cat([mask, torch.ones_like(closing)], dim=1)
        if batched:
            return InterleavedOutput(items=items, token_ids=sequences)
        return InterleavedOutput(items=items[0], token_ids=sequences[0])

    def _interleaved_image(self, prefix, known: list[list], num_inference_steps, guidance_scale, image_guidance_scale,
                           generator, callback):  # fmt: skip
        """Denoise one image per row after `prefix`; `known` holds each row's clean latents so far. Guidance against
        those images alone (`<|bos|><|boi|>` for a row without), in a prefix of its own; a third with
        `image_guidance_scale` > 1 (rows with nothing)."""
        timesteps = self._start_sampling(guidance_scale, num_inference_steps, image_guidance_scale)
        prefixes = [prefix]
        if self.do_classifier_free_guidance:
            rows = [list(images) or [""] for images in known]
            rows += [[""]] * len(known) if self._image_guidance_scale > 1 else []
            enc = self.processor(rows, append_boi=True, padding_side="left", images_as_latents=True)
            enc = enc.to(self._execution_device)
            image_latents = enc["image_latents"].to(self.transformer.dtype) if "image_latents" in enc else None
            prefixes.append(self.prefill(enc["input_ids"], enc["attention_mask"], image_latents))
        latents = self.prepare_latents(len(known), self.transformer.dtype, generator)
        return self.denoise(prefixes, latents, timesteps, generator, callback)

    # -- conversations ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def chat(
        self,
        messages: list,
        max_new_tokens: int = 64,
        max_images: int = 1,
        num_inference_steps: int | None = None,
        guidance_scale: float = 3.0,
        image_guidance_scale: float | None = None,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        callback_on_step_end=None,
    ) -> ChatOutput:
        r"""
        The assistant's next turn of a conversation: text and images, interleaved as the model writes them.

        Args:
            messages: `[{"role": "user" | "assistant", "content": ...}, ...]` ending with a user turn; a content is a
                string, an image (PIL, uint8 array, (3, H, W) tensor in [−1, 1]) or a list of them. A list of such
                conversations is a batch. The processor lays them out (`user:` …, `assistant:` … `<|eos|>`).
            max_new_tokens, max_images, num_inference_steps, guidance_scale, image_guidance_scale, temperature,
            generator, output_type, callback_on_step_end: as `generate_interleaved`; the turn ends at `<|eos|>` (or
            when a limit is hit).

        Returns `ChatOutput`: `message` is the new turn (`{"role": "assistant", "content": [...]}`) to append before
        the next user turn.
        """
        batched = isinstance(messages, list) and bool(messages) and all(isinstance(m, list) for m in messages)
        conversations = messages if batched else [messages]
        for conversation in conversations:
            self.processor.conversation_prompt(conversation)
        out = self.generate_interleaved(conversations if batched else conversations[0], max_new_tokens=max_new_tokens,
                                        max_images=max_images, num_inference_steps=num_inference_steps,
                                        guidance_scale=guidance_scale, image_guidance_scale=image_guidance_scale,
                                        temperature=temperature, generator=generator, output_type=output_type,
                                        callback_on_step_end=callback_on_step_end)  # fmt: skip
        turns = [{"role": "assistant", "content": items} for items in (out.items if batched else [out.items])]
        return ChatOutput(message=turns if batched else turns[0], token_ids=out.token_ids)

    # -- one folder for transformers and diffusers ------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loader (variant=, a per-component torch_dtype dict, device_map, … all as diffusers documents).

        A saved folder carries its code for users who cannot import this package, and diffusers then runs that code
        (pipeline and model) and asks for `trust_remote_code`. A local folder whose code files are byte-identical to
        this package's runs nothing foreign, so that trust is given here; a local folder with other code is refused
        with the files named (refresh them, or pass trust_remote_code=True to run the folder's own code)."""
        check_pipeline_folder(pretrained_model_name_or_path)
        if "trust_remote_code" not in kwargs and Path(str(pretrained_model_name_or_path)).is_dir():
            stale = _stale_code_files(pretrained_model_name_or_path)
            if stale:
                raise ValueError(
                    f"The code files {stale} in {pretrained_model_name_or_path} differ from this package's. "
                    "Refresh them (python -m conversion.export_pipeline --refresh-code "
                    f"{pretrained_model_name_or_path}) or pass trust_remote_code=True to run the folder's own code."
                )
            kwargs["trust_remote_code"] = True
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        """Save a folder that loads with `TransfusionPipeline.from_pretrained`, with
        `DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)` and (model and processor) with
        `AutoModelForCausalLM/AutoProcessor.from_pretrained(dir + "/transformer", trust_remote_code=True)`."""
        if getattr(self.transformer, "_hf_peft_config_loaded", False):
            raise ValueError(
                "A LoRA adapter is loaded: saving now would write its layers under prefixed keys that reload as fresh "
                "weights. Call pipe.fuse_lora() then pipe.unload_lora_weights() first (or unload it without fusing)."
            )
        super().save_pretrained(save_directory, **kwargs)
        root = Path(save_directory)
        self.processor.save_pretrained(root / MODEL_SUBFOLDER)  # AutoProcessor works on the model folder
        save_code(root)
        # diffusers records the classes' import paths; the folder's own code files are what loads them
        import json

        index_path = root / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = ["pipeline_transfusion", "TransfusionPipeline"]
        index[MODEL_SUBFOLDER] = ["modeling_transfusion", "TransfusionForCausalLM"]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _conditional_rows(prefixes: list[Prefix], batch: int) -> list[Prefix]:
    """Guidance ended: keep the B conditional rows (the first prefix, or the first B rows of a doubled one)."""
    if len(prefixes) > 1:
        return prefixes[:1]
    prefix = prefixes[0]
    prefix.cache.batch_select_indices(torch.arange(batch, device=prefix.mask.device))
    return [Prefix(prefix.cache, prefix.mask[:batch])]


def _stale_code_files(folder) -> list[str]:
    """The shipped code files that are missing from a saved folder or differ from this package's sources."""
    folder, stale = Path(str(folder)), []
    for target in (folder, folder / MODEL_SUBFOLDER):
        for source in shipped_code_files():
            copy = target / source.name
            if not copy.is_file() or copy.read_bytes() != source.read_bytes():
                stale.append(str(copy.relative_to(folder)))
    return stale


__all__ = [
    "ChatOutput",
    "InterleavedOutput",
    "TransfusionPipeline",
    "TransfusionPipelineOutput",
    "save_code",
    "shipped_code_files",
]
