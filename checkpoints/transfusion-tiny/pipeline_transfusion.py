"""TransfusionPipeline: text→image, image→text and interleaved generation with one Transfusion model.

The pipeline only orchestrates. Its `transformer` component *is* the transformers `TransfusionForCausalLM` (which
owns the VAE, the patch encoder/decoder and the cache helpers), so this file imports nothing from the model package:
it must load as remote code next to a saved checkpoint.

Denoising (one loop, `_denoise`, used by every path): the prompt prefix — conditional and unconditional rows as one
batch for classifier-free guidance — runs once and fills a KV cache; each step runs only the image slots against
that cache and crops the cache back. With `finalize=True` the finished latent runs once more at t = 0 followed by
`<|eoi|>`, so text generated afterwards attends to the clean image.
"""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import DynamicCache

# Modes that convert to RGB without guessing a value range (16-bit and float images are refused).
SUPPORTED_IMAGE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
MODEL_SUBFOLDER = "transformer"
CODE_FILES = (
    "configuration_transfusion.py",
    "modeling_transfusion.py",
    "patching_transfusion.py",
    "processing_transfusion.py",
)


@dataclass
class TransfusionPipelineOutput(BaseOutput):
    """images: PIL images, a numpy array (N, H, W, 3), a tensor (N, 3, H, W) or latents (N, C, h, w)."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None = None


@dataclass
class InterleavedOutput(BaseOutput):
    """items: the generated text pieces and images, in order. token_ids: the whole generated sequence."""

    items: list | None = None
    token_ids: torch.Tensor | None = None


class TransfusionPipeline(DiffusionPipeline):
    r"""
    Text→image with a Transfusion model, plus captioning (`caption`) and interleaved text+image generation
    (`generate_interleaved`) with the same model.

    Components:
        transformer: `TransfusionForCausalLM` (holds the VAE: `pipe.vae is pipe.transformer.vae`).
        scheduler: any diffusers scheduler for the model's prediction type (DDPM, DDIM, DPM-Solver++, … for
            ε/v-prediction; `FlowMatchEulerDiscreteScheduler` for flow matching).
        tokenizer: the model's tokenizer (with `<|bos|> <|eos|> <|pad|> <|boi|> <|eoi|> <|image|>`).
    """

    model_cpu_offload_seq = "transformer"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, transformer, scheduler, tokenizer):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, tokenizer=tokenizer)
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, do_resize=True, resample="bicubic")

    @property
    def vae(self):
        return self.transformer.vae

    @property
    def image_size(self) -> int:
        return self.transformer.config.image_size

    # -- inputs --------------------------------------------------------------------------------------------------------
    def _text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def _pad_left(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad token rows: (B, L) ids and attention mask."""
        c = self.transformer.config
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), c.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, length - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, length - len(row) :] = 1
        return ids.to(self._execution_device), mask.to(self._execution_device)

    def check_inputs(self, prompt, negative_prompt, height, width, num_inference_steps, guidance_scale, latents, n):
        if isinstance(prompt, str):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) for p in prompt):
            raise ValueError(f"prompt must be a non-empty string or list of strings, got {prompt!r}")
        negatives = None
        if negative_prompt is not None:
            negatives = [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
            if not isinstance(negatives, list) or len(negatives) not in (1, len(prompt)):
                raise ValueError(f"negative_prompt must be a string or a list of {len(prompt)} strings")
            negatives = negatives * (len(prompt) // len(negatives))  # one per prompt
        grid = self.transformer.config.vae_downsample * self.transformer.config.patch_size
        for name, value in (("height", height), ("width", width)):
            if value % grid:
                raise ValueError(f"{name}={value} is off the patch grid: it must be a multiple of {grid} (VAE × patch)")
            if value != self.image_size:
                raise ValueError(f"{name}={value}: this model generates {self.image_size}×{self.image_size} images")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be ≥ 0 (1 = no guidance), got {guidance_scale}")
        if n < 1:
            raise ValueError(f"num_images_per_prompt must be ≥ 1, got {n}")
        if latents is not None:
            c = self.transformer.config
            shape = (len(prompt) * n, c.latent_channels, c.latent_size, c.latent_size)
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        return prompt, negatives

    def encode_prompt(self, prompts: list[str], negative_prompts: list[str] | None, do_cfg: bool):
        """Token rows `<|bos|> prompt <|boi|>` (then the unconditional/negative rows when guiding), left-padded."""
        c = self.transformer.config
        rows = [[c.bos_token_id, *self._text_ids(p), c.boi_token_id] for p in prompts]
        if do_cfg:
            negatives = negative_prompts or [""] * len(prompts)
            rows += [[c.bos_token_id, *self._text_ids(p), c.boi_token_id] for p in negatives]
        return self._pad_left(rows)

    def prepare_latents(self, batch_size, dtype, generator, latents=None):
        c = self.transformer.config
        shape = (batch_size, c.latent_channels, c.latent_size, c.latent_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=dtype)
        latents = latents.to(device=self._execution_device, dtype=dtype)
        return latents * getattr(self.scheduler, "init_noise_sigma", 1.0)

    # -- the denoising loop ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def _denoise(
        self,
        prefix_ids: torch.Tensor,
        prefix_mask: torch.Tensor,
        latents: torch.Tensor,
        num_inference_steps: int,
        guidance_scale: float,
        generator=None,
        prefix_latents: torch.Tensor | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=("latents",),
        finalize: bool = False,
    ):
        """Denoise `latents` (B, C, h, w) after the prefix rows (B, or 2B with unconditional rows when guiding).

        Returns `(latents, cache, logits)`: with `finalize`, the cache of the B conditional rows holds the prefix,
        the clean image (t = 0) and `<|eoi|>`, and `logits` (B, V) predict the token after `<|eoi|>`."""
        model, c = self.transformer, self.transformer.config
        batch = latents.shape[0]
        do_cfg = prefix_ids.shape[0] == 2 * batch
        cache = DynamicCache(config=c)
        model(
            input_ids=prefix_ids,
            attention_mask=prefix_mask,
            image_latents=prefix_latents,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        prefix_length = cache.get_seq_length()
        rows = prefix_ids.shape[0]
        slots = torch.full((rows, c.image_slots), c.image_token_id, dtype=torch.long, device=prefix_ids.device)
        step_mask = torch.cat([prefix_mask, torch.ones_like(slots)], dim=1)

        self.scheduler.set_timesteps(num_inference_steps, device=latents.device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                latent_in = torch.cat([latents, latents]) if do_cfg else latents
                if hasattr(self.scheduler, "scale_model_input"):
                    latent_in = self.scheduler.scale_model_input(latent_in, t)
                out = model(
                    input_ids=slots,
                    attention_mask=step_mask,
                    past_key_values=cache,
                    use_cache=True,
                    image_latents=latent_in,
                    image_timesteps=t.reshape(1).expand(rows).to(latents.device),
                    logits_to_keep=1,
                )
                model.crop_cache(cache, prefix_length)  # the next step sees the prefix only
                prediction = out.image_predictions.to(latents.dtype)
                if do_cfg:
                    cond, uncond = prediction.chunk(2)
                    prediction = uncond + guidance_scale * (cond - uncond)
                latents = self.scheduler.step(prediction, t, latents, generator=generator, return_dict=False)[0]
                if callback_on_step_end is not None:
                    local = {"latents": latents}
                    kwargs = {k: local[k] for k in callback_on_step_end_tensor_inputs}
                    latents = callback_on_step_end(self, i, t, kwargs).pop("latents", latents)
                progress.update()

        logits = None
        if finalize:
            if do_cfg:
                cache.batch_select_indices(torch.arange(batch, device=latents.device))
            ids = torch.cat([slots[:batch], torch.full_like(slots[:batch, :1], c.eoi_token_id)], dim=1)
            out = model(
                input_ids=ids,
                attention_mask=torch.cat([prefix_mask[:batch], torch.ones_like(ids)], dim=1),
                past_key_values=cache,
                use_cache=True,
                image_latents=latents,
                image_timesteps=torch.zeros(batch, device=latents.device),
                logits_to_keep=1,
            )
            logits = out.logits[:, -1]
        return latents, cache, logits

    # -- text → image ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        r"""
        Generate images from text.

        Args:
            prompt: one prompt or a list. negative_prompt: replaces the empty unconditional prompt of guidance.
            height, width: pixels; must equal the model's image size (default).
            num_inference_steps: scheduler steps. guidance_scale: classifier-free guidance (1 or less = none).
            num_images_per_prompt, generator (one, or a list with one per image), latents (initial noise).
            output_type: "pil", "np", "pt" or "latent". callback_on_step_end(pipe, i, t, {"latents": …}) → dict.
        """
        # 1. check inputs
        height = height or self.image_size
        width = width or self.image_size
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be one of 'pil', 'np', 'pt', 'latent', got {output_type!r}")
        bad = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs {sorted(bad)} not in {self._callback_tensor_inputs}")
        prompts, negatives = self.check_inputs(
            prompt, negative_prompt, height, width, num_inference_steps, guidance_scale, latents, num_images_per_prompt
        )
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        if negatives is not None:
            negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
        do_cfg = guidance_scale > 1.0

        # 2. encode the prompt (conditional rows, then unconditional rows)
        prefix_ids, prefix_mask = self.encode_prompt(prompts, negatives, do_cfg)
        # 3. prepare latents
        dtype = self.transformer.dtype
        latents = self.prepare_latents(len(prompts), dtype, generator, latents)
        # 4–5. timesteps and the denoising loop
        latents, _, _ = self._denoise(
            prefix_ids,
            prefix_mask,
            latents,
            num_inference_steps,
            guidance_scale,
            generator=generator,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        # 6. decode
        images = latents if output_type == "latent" else self.postprocess(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return TransfusionPipelineOutput(images=images)

    def postprocess(self, latents: torch.Tensor, output_type: str = "pil"):
        """Latents → images through the model's VAE."""
        pixels = self.transformer.decode_latents(latents)
        return self.image_processor.postprocess(pixels.float(), output_type=output_type)

    # -- image → text --------------------------------------------------------------------------------------------
    def preprocess_image(self, image) -> torch.Tensor:
        """A PIL image (any size, a supported mode), uint8 numpy array or (3, H, W) tensor in [−1, 1] → (3, S, S)."""
        if isinstance(image, torch.Tensor):
            if image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"An image tensor must be (3, H, W) in [-1, 1], got shape {tuple(image.shape)}")
            image = torch.nn.functional.interpolate(image[None].float(), size=(self.image_size,) * 2, mode="bilinear")
            return image[0].clamp(-1, 1)
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim not in (2, 3):
                raise ValueError(f"A numpy image must be uint8 HW or HWC, got {image.dtype} {image.shape}")
            image = PIL.Image.fromarray(image)
        if not isinstance(image, PIL.Image.Image):
            raise ValueError(f"Unsupported image type {type(image).__name__}; pass a PIL image, uint8 array or tensor")
        if image.mode not in SUPPORTED_IMAGE_MODES:
            raise ValueError(f"Unsupported image mode {image.mode!r}; convert it to 'RGB' or 'L' first")
        return self.image_processor.preprocess(image.convert("RGB"), height=self.image_size, width=self.image_size)[0]

    @torch.no_grad()
    def caption(
        self, images, prompt: str | None = None, max_new_tokens: int = 32, do_sample: bool = False, **generate_kwargs
    ) -> list[str]:
        """Describe one image or a list: `<|bos|> image [prompt]` then greedy decoding with the KV cache."""
        images = images if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise ValueError("caption() needs at least one image")
        c = self.transformer.config
        pixels = torch.stack([self.preprocess_image(im) for im in images]).to(self._execution_device)
        image_row = [c.boi_token_id] + [c.image_token_id] * c.image_slots + [c.eoi_token_id]
        row = [c.bos_token_id, *image_row, *(self._text_ids(prompt) if prompt else [])]
        ids, mask = self._pad_left([row] * len(images))
        out = self.transformer.generate(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=pixels.to(self.transformer.dtype),
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            eos_token_id=c.eos_token_id,
            pad_token_id=c.pad_token_id,
            bad_words_ids=[[c.boi_token_id], [c.image_token_id]],
            **generate_kwargs,
        )
        return [s.strip() for s in self.tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)]

    # -- interleaved ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_interleaved(
        self,
        prompt: str | list,
        max_new_tokens: int = 64,
        max_images: int = 4,
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        callback_on_step_end=None,
    ) -> InterleavedOutput:
        """Free decoding in which the model itself may emit `<|boi|>`: the image is then denoised (prefix cached,
        guidance against `<|bos|><|boi|>`), closed with `<|eoi|>`, and decoding continues on the clean image.

        `prompt` is a string or a list of strings and images. Returns the generated items (str and images) in order.
        """
        c, model = self.transformer.config, self.transformer
        items = prompt if isinstance(prompt, list) else [prompt]
        if not items:
            raise ValueError("prompt must not be empty")
        row, known_latents = [c.bos_token_id], []
        for item in items:
            if isinstance(item, str):
                row += self._text_ids(item)
            else:
                pixels = self.preprocess_image(item)[None].to(self._execution_device, model.dtype)
                known_latents.append(model.encode_images(pixels))
                row += [c.boi_token_id] + [c.image_token_id] * c.image_slots + [c.eoi_token_id]
        ids = torch.tensor([row], device=self._execution_device)
        prefix_latents = torch.cat(known_latents) if known_latents else None
        cache = DynamicCache(config=c)
        logits = model(input_ids=ids, image_latents=prefix_latents, past_key_values=cache, use_cache=True).logits[:, -1]
        outputs, text, generated = [], [], []
        n_images = 0
        for _ in range(max_new_tokens):
            if n_images >= max_images:
                logits[:, c.boi_token_id] = -float("inf")
            logits[:, c.image_token_id] = logits[:, c.eoi_token_id] = -float("inf")
            if temperature > 0:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                token = torch.multinomial(probs, 1, generator=generator)
            else:
                token = logits.argmax(-1, keepdim=True)
            token_id = int(token)
            generated.append(token_id)
            ids = torch.cat([ids, token], dim=1)
            if token_id == c.eos_token_id:
                break
            if token_id != c.boi_token_id:
                text.append(token_id)
                logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1]
                continue
            if text:
                outputs.append(self.tokenizer.decode(text, skip_special_tokens=True))
                text = []
            do_cfg = guidance_scale > 1.0
            rows = [ids[0].tolist()] + ([[c.bos_token_id, c.boi_token_id]] if do_cfg else [])
            prefix_ids, prefix_mask = self._pad_left(rows)
            latents = self.prepare_latents(1, model.dtype, generator)
            latents, cache, logits = self._denoise(
                prefix_ids,
                prefix_mask,
                latents,
                num_inference_steps,
                guidance_scale,
                generator=generator,
                prefix_latents=prefix_latents,
                callback_on_step_end=callback_on_step_end,
                finalize=True,
            )
            prefix_latents = latents if prefix_latents is None else torch.cat([prefix_latents, latents])
            slots = torch.full((1, c.image_slots), c.image_token_id, device=ids.device)
            ids = torch.cat([ids, slots, torch.full_like(slots[:, :1], c.eoi_token_id)], dim=1)
            generated += [c.image_token_id] * c.image_slots + [c.eoi_token_id]
            outputs.append(latents if output_type == "latent" else self.postprocess(latents, output_type)[0])
            n_images += 1
        if text:
            outputs.append(self.tokenizer.decode(text, skip_special_tokens=True))
        return InterleavedOutput(items=outputs, token_ids=ids)

    # -- one folder for transformers and diffusers -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a saved folder (or Hub repo) into this class. `DiffusionPipeline.from_pretrained(path,
        trust_remote_code=True)` works too; it takes the pipeline code stored in the folder."""
        if cls is not TransfusionPipeline or "custom_pipeline" in kwargs:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        import diffusers
        from huggingface_hub import snapshot_download
        from transformers import AutoModelForCausalLM, AutoTokenizer

        root = Path(str(pretrained_model_name_or_path))
        if not root.is_dir():
            root = Path(snapshot_download(str(pretrained_model_name_or_path), revision=kwargs.pop("revision", None)))
        index_path = root / "model_index.json"
        if not index_path.exists():
            raise ValueError(f"{root} is not a saved TransfusionPipeline: it has no model_index.json")
        model_kwargs = {k: kwargs.pop(k) for k in ("dtype", "torch_dtype", "device_map", "trust_remote_code") if k in kwargs}
        if "torch_dtype" in model_kwargs:
            model_kwargs["dtype"] = model_kwargs.pop("torch_dtype")
        transformer = kwargs.pop("transformer", None) or AutoModelForCausalLM.from_pretrained(
            root / MODEL_SUBFOLDER, **model_kwargs
        )
        tokenizer = kwargs.pop("tokenizer", None) or AutoTokenizer.from_pretrained(root / "tokenizer")
        scheduler = kwargs.pop("scheduler", None)
        if scheduler is None:
            scheduler_class = json.loads((root / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
            scheduler = getattr(diffusers, scheduler_class).from_pretrained(root / "scheduler")
        if kwargs:
            raise ValueError(f"Unexpected arguments for TransfusionPipeline.from_pretrained: {sorted(kwargs)}")
        pipe = cls(transformer=transformer, scheduler=scheduler, tokenizer=tokenizer)
        pipe.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
        return pipe

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
        model_dir = root / MODEL_SUBFOLDER
        # the processor next to the model, so AutoProcessor works on the model folder
        self._processor_config(model_dir)
        here = Path(__file__).resolve()
        shutil.copy(here, root / here.name)
        for name in CODE_FILES:
            source = model_dir / name
            if not source.exists():
                source = _find_code_file(name, type(self.transformer))
            if source is not None and source.exists():
                if source.resolve() != (model_dir / name).resolve():
                    shutil.copy(source, model_dir / name)
                shutil.copy(source, root / name)
        index_path = root / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = ["pipeline_transfusion", "TransfusionPipeline"]
        index[MODEL_SUBFOLDER] = ["modeling_transfusion", "TransfusionForCausalLM"]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def _processor_config(self, model_dir: Path) -> None:
        c = self.transformer.config
        self.tokenizer.save_pretrained(model_dir)
        config = {
            "auto_map": {"AutoProcessor": "processing_transfusion.TransfusionProcessor"},
            "image_size": c.image_size,
            "image_slots": c.image_slots,
            "processor_class": "TransfusionProcessor",
        }
        (model_dir / "processor_config.json").write_text(json.dumps(config, indent=2) + "\n")

    # -- LoRA adapters (PEFT) -----------------------------------------------------------------------------------------
    # An adapter is a PEFT folder (`adapter_config.json` + `adapter_model.safetensors`), as written by
    # `training/finetune_lora.py` or any `PeftModel.save_pretrained`. Loading goes through transformers'
    # `load_adapter`; the shape check before it turns an adapter made for another model into a ValueError naming the
    # module and both shapes. To save a pipeline with the LoRA in its weights: `fuse_lora()`, `unload_lora_weights()`,
    # then `save_pretrained(...)`. Unloading restores the weight-name conversions that `load_adapter` replaced; without
    # that every key would be saved with a `base_model.model.` prefix and the reload would re-initialise them.

    def load_lora_weights(self, pretrained_model_name_or_path, adapter_name: str = "default", **kwargs) -> None:
        """Load a PEFT LoRA adapter (local folder or Hub repo id) into the transformer and make it the active one.

        Extra keyword arguments go to `transformers.PreTrainedModel.load_adapter` (e.g. `revision`, `token`)."""
        model = self.transformer
        folder = _adapter_folder(pretrained_model_name_or_path, kwargs)
        _check_adapter_fits(model, folder)
        if not getattr(model, "_hf_peft_config_loaded", False):
            self._lora_base_state = {
                "weight_conversions": vars(model).get("_weight_conversions", _UNSET),
                "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
            }
        model.load_adapter(str(folder), adapter_name=adapter_name, **kwargs)
        model.set_adapter(adapter_name)

    def fuse_lora(self, lora_scale: float = 1.0, adapter_names: list[str] | None = None) -> None:
        """Merge the active LoRA adapter(s), scaled by `lora_scale`, into the base weights. Outputs do not change
        (at `lora_scale=1`); `unload_lora_weights()` afterwards keeps the fused weights and drops the LoRA layers."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        model = self.transformer
        if not getattr(model, "_hf_peft_config_loaded", False):
            raise ValueError("No LoRA adapter is loaded: call load_lora_weights(path) before fuse_lora()")
        for module in model.modules():
            if isinstance(module, BaseTunerLayer) and not module.merged:
                if lora_scale != 1.0:
                    module.scale_layer(lora_scale)
                module.merge(adapter_names=adapter_names)
        self._lora_fused = True

    def unload_lora_weights(self) -> None:
        """Remove every LoRA adapter from the transformer. Un-fused adapters are simply gone (the model computes what
        the base model computed); fused ones stay in the weights, as in diffusers. Restores the model's weight-name
        conversions and trainable flags from before `load_lora_weights`, so `save_pretrained` writes plain keys."""
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        model = self.transformer
        fused = getattr(self, "_lora_fused", False)
        done: list[str] = []
        for name, module in list(model.named_modules()):
            if not isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
                continue
            if any(name.startswith(prefix + ".") for prefix in done):
                continue  # inside a layer already replaced
            if isinstance(module, AuxiliaryTrainingWrapper):  # modules_to_save: the trained copy only if fused
                replacement = (
                    module.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None)
                    if fused
                    else module.original_module
                )
            else:
                replacement = module.get_base_layer()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, replacement)
            done.append(name)
        if hasattr(model, "peft_config"):
            del model.peft_config
        model._hf_peft_config_loaded = False

        state = getattr(self, "_lora_base_state", None) or {}
        conversions = state.get("weight_conversions", _UNSET)
        if conversions is _UNSET:  # the adapter came through model.load_adapter directly: drop only its renamings
            current = vars(model).get("_weight_conversions")
            if current is not None:
                model._weight_conversions = [c for c in current if not _is_adapter_renaming(c)]
        elif conversions is _MISSING:
            vars(model).pop("_weight_conversions", None)
        else:
            model._weight_conversions = conversions
        for param_name, param in model.named_parameters():
            param.requires_grad_(state.get("requires_grad", {}).get(param_name, param.requires_grad))
        self._lora_base_state = None
        self._lora_fused = False


SCHEDULER_NAMES = {  # short name (CLI flags) → diffusers class; a flow-matching model samples with flow-euler only
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "flow-euler": "FlowMatchEulerDiscreteScheduler",
}


def scheduler_class(name: str, diffusion_type: str):
    """The diffusers scheduler class `name` stands for (see SCHEDULER_NAMES), checked against the model's diffusion
    type; for a flow-matching model "euler" means flow-euler."""
    import diffusers

    if name not in SCHEDULER_NAMES:
        raise ValueError(f"scheduler {name!r}; expected one of {sorted(SCHEDULER_NAMES)}")
    flow = diffusion_type == "flow_matching"
    name = "flow-euler" if flow and name == "euler" else name
    if (name == "flow-euler") != flow:
        raise ValueError(f"scheduler {name!r} does not fit a {diffusion_type} model; use "
                         f"{'flow-euler' if flow else 'ddim, ddpm, dpm or euler'}")  # fmt: skip
    return getattr(diffusers, SCHEDULER_NAMES[name])


def scheduler_arguments(scheduler) -> set[str]:
    """The config keys the scheduler's class takes. A diffusers config can also carry keys of the scheduler it was
    converted from, which the class ignores (a DDIM built from a DPM-Solver config keeps `algorithm_type`)."""
    import inspect

    return set(inspect.signature(type(scheduler).__init__).parameters) - {"self", "kwargs"}


def reconfigure_scheduler(scheduler, overrides: dict):
    """A new scheduler of the same class with `overrides` of its config, e.g. {"algorithm_type": "sde-dpmsolver++"};
    keys are checked against the class's own arguments (`scheduler_arguments`)."""
    accepted = scheduler_arguments(scheduler)
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ValueError(f"scheduler config overrides {unknown} are not in {type(scheduler).__name__}'s config; "
                         f"it takes {sorted(accepted)}")  # fmt: skip
    return type(scheduler).from_config(scheduler.config, **overrides)


def _find_code_file(name: str, model_class) -> Path | None:
    """The model's source folder (package or remote-code cache) holds the code files to copy."""
    import inspect

    folder = Path(inspect.getfile(model_class)).parent
    candidate = folder / name
    return candidate if candidate.exists() else None


# -- LoRA helpers -------------------------------------------------------------------------------------------------------
_UNSET = object()  # nothing recorded
_MISSING = "missing"  # the model had no `_weight_conversions` attribute before the adapter was loaded


def _is_adapter_renaming(conversion) -> bool:
    patterns = [*getattr(conversion, "source_patterns", []), *getattr(conversion, "target_patterns", [])]
    return any("base_model.model" in p or "lora_" in p for p in patterns)


def _adapter_folder(name_or_path, kwargs: dict) -> Path:
    """A local adapter folder: the path itself, or the adapter files of a Hub repo downloaded to the cache."""
    path = Path(str(name_or_path))
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith((".", "/")):
        raise ValueError(f"{name_or_path} is not a LoRA adapter folder (expected adapter_config.json inside it)")
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            str(name_or_path),
            revision=kwargs.get("revision"),
            token=kwargs.get("token"),
            allow_patterns=["adapter_config.json", "adapter_model.*"],
        )
    )


def _adapter_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    if (folder / "adapter_model.safetensors").exists():
        from safetensors import safe_open

        with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    if (folder / "adapter_model.bin").exists():
        state = torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
        return {key: tuple(value.shape) for key, value in state.items()}
    raise ValueError(f"{folder} holds no adapter_model.safetensors or adapter_model.bin")


def _check_adapter_fits(model, folder: Path) -> None:
    """Raise ValueError naming every adapter tensor that does not fit `model` (a module it lacks, another size)."""
    import re

    if not (folder / "adapter_config.json").exists():
        raise ValueError(f"{folder} is not a PEFT adapter folder: it has no adapter_config.json")
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{folder} holds a {config.get('peft_type')} adapter; load_lora_weights loads LoRA adapters")
    # the model's own weights under their plain names (PEFT wrappers of earlier adapters stripped)
    plain = {}
    for key, value in model.state_dict().items():
        key = re.sub(r"\.(base_layer|original_module)(?=\.)|\.modules_to_save\.[^.]+(?=\.)", "", key)
        plain.setdefault(key, tuple(value.shape))
    modules = {name: module for name, module in model.named_modules()}
    problems = []
    for key, shape in sorted(_adapter_shapes(folder).items()):
        name = key.removeprefix("base_model.model.")
        match = re.match(r"(.+?)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?(?:\.weight)?$", name)
        if match is None:  # a full module saved through modules_to_save
            if name not in plain:
                problems.append(f"{name}: this model has no such weight")
            elif plain[name] != shape:
                problems.append(f"{name}: adapter {list(shape)} vs model {list(plain[name])}")
            continue
        module_name, part = match.groups()
        module = modules.get(module_name)
        weight = getattr(getattr(module, "base_layer", module), "weight", None)
        if weight is None:
            problems.append(f"{module_name}: the adapter adapts it, this model has no such layer")
            continue
        # lora_A reads the layer's input, lora_B writes its output (embedding LoRA the other way round)
        axis, got, side = {
            "lora_A": (1, shape[1], "input"),
            "lora_B": (0, shape[0], "output"),
            "lora_embedding_A": (0, shape[1], "vocabulary"),
            "lora_embedding_B": (1, shape[0], "embedding"),
        }[part]
        if weight.shape[axis] != got:
            problems.append(
                f"{module_name}: adapter {part} {list(shape)} needs {side} size {got}, the layer has {weight.shape[axis]}"
            )
    if problems:
        shown = "; ".join(problems[:6]) + (f"; … {len(problems) - 6} more" if len(problems) > 6 else "")
        base = config.get("base_model_name_or_path")
        raise ValueError(
            f"The LoRA adapter in {folder} does not fit this model"
            + (f" (it was trained on {base})" if base else "")
            + f": {shown}"
        )


__all__ = ["TransfusionPipeline", "TransfusionPipelineOutput", "InterleavedOutput"]
