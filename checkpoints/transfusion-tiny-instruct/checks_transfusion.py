"""Input checks of the Transfusion model: every bad input is refused here with a message that names the argument and
what is allowed, before it can fail deep inside torch or pass silently as NaN.

Shape legend as in modeling_transfusion.py (B batch, L tokens in this call, N images, C×h×w latents).
"""

import json
import numbers
from pathlib import Path

import torch

# (the config is only a type here: diffusers copies a remote pipeline's direct imports, not theirs)
TransfusionConfig = "TransfusionConfig"

# Bounds of a pipeline call: past them a call is a typo or minutes of sampling, not a request.
MAX_INFERENCE_STEPS = 1000
MAX_IMAGES_PER_CALL = 64


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def check_ids(config: TransfusionConfig, input_ids, inputs_embeds) -> None:
    """Exactly one of input_ids (B, L) integers in the vocabulary, or inputs_embeds (B, L, D); L ≥ 1. (Sequences past
    max_position_embeddings run, as in transformers' models; the pipeline and processor refuse prompts that long.)"""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError(
            "Pass exactly one of input_ids or inputs_embeds (image slots in inputs_embeds are the positions that "
            "hold the <|image|> token's embedding)"
        )
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.ndim != 2:
            dtype = getattr(input_ids, "dtype", type(input_ids).__name__)
            raise ValueError(
                f"input_ids must be a 2-D integer tensor (batch, length), got {dtype} of shape {_shape(input_ids)}; "
                "the processor returns one"
            )
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= config.vocab_size):
            bad = input_ids[(input_ids < 0) | (input_ids >= config.vocab_size)]
            raise ValueError(
                f"input_ids contain id(s) {sorted(set(bad.tolist()))[:5]} outside the vocabulary "
                f"[0, {config.vocab_size}); check the tokenizer matches this model"
            )
        shape = tuple(input_ids.shape)
    else:
        if (not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.ndim != 3
                or inputs_embeds.shape[-1] != config.hidden_size):
            raise ValueError(
                f"inputs_embeds must be a (batch, length, {config.hidden_size}) tensor, got {_shape(inputs_embeds)}"
            )
        shape = tuple(inputs_embeds.shape[:2])
    if 0 in shape:
        raise ValueError(f"input_ids / inputs_embeds are empty (shape {shape}): every row needs at least one token")


def check_attention_mask(attention_mask, batch: int, total: int) -> None:
    """(B, past + L) of 0/1."""
    if attention_mask is None:
        return
    if (not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 2
            or tuple(attention_mask.shape) != (batch, total)):
        raise ValueError(
            f"attention_mask must have shape (batch, cached + new tokens) = ({batch}, {total}), "
            f"got {_shape(attention_mask)}"
        )


def check_image_inputs(config: TransfusionConfig, blocks, image_latents, image_timesteps) -> int:
    """The images fill the `<|image|>` slots exactly: N × image_slots slots, latents (N, C, h, w) finite, timesteps (N,)
    in [0, num_train_timesteps]. Returns N."""
    c = config
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
        return 0
    expected = (c.latent_channels, c.latent_size, c.latent_size)
    if (not isinstance(image_latents, torch.Tensor) or image_latents.ndim != 4
            or tuple(image_latents.shape[1:]) != expected):
        raise ValueError(
            f"image_latents must have shape (num_images, {expected}) (a tensor), got {_shape(image_latents)}"
        )
    if image_latents.shape[0] != n_images:
        raise ValueError(
            f"Number of images ({image_latents.shape[0]}) does not match the image slots in input_ids "
            f"({n_slots} slots = {n_images} images of {c.image_slots} slots)"
        )
    if not torch.isfinite(image_latents).all():
        raise ValueError("image_latents contain NaN or infinite values")
    if image_timesteps is not None:
        if not isinstance(image_timesteps, torch.Tensor) or tuple(image_timesteps.shape) != (n_images,):
            raise ValueError(f"image_timesteps must have shape ({n_images},), got {_shape(image_timesteps)}")
        t = image_timesteps.float()
        if not torch.isfinite(t).all() or (t < 0).any() or (t > c.num_train_timesteps).any():
            raise ValueError(
                f"image_timesteps must lie in [0, {c.num_train_timesteps}], got {image_timesteps.tolist()}"
            )
    return n_images


def check_pixels(pixel_values, channels: int, size: int) -> None:
    """(N, channels, size, size) finite, in [−1, 1] (a little float slack)."""
    expected = (channels, size, size)
    if (not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4
            or tuple(pixel_values.shape[1:]) != expected):
        raise ValueError(
            f"pixel_values must have shape (num_images, {channels}, {size}, {size}), got {_shape(pixel_values)}; "
            f"resize images to {size}×{size} (the processor does this)"
        )
    if not torch.isfinite(pixel_values).all():
        raise ValueError("pixel_values contain NaN or infinite values")
    low, high = float(pixel_values.min()), float(pixel_values.max())
    if low < -1.001 or high > 1.001:
        raise ValueError(
            f"pixel_values must lie in [-1, 1] (the processor maps uint8 images there), "
            f"got values in [{low:.3g}, {high:.3g}]"
        )


def check_labels(config: TransfusionConfig, name: str, labels, shape: tuple) -> None:
    """(B, L) integers: −100 (no loss) or ids in the vocabulary."""
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or tuple(labels.shape) != tuple(shape):
        dtype = getattr(labels, "dtype", type(labels).__name__)
        raise ValueError(
            f"{name} must be an integer tensor of the shape of input_ids {tuple(shape)}, got {dtype} {_shape(labels)}"
        )
    bad = labels[(labels != -100) & ((labels < 0) | (labels >= config.vocab_size))]
    if bad.numel():
        raise ValueError(
            f"{name} hold {sorted(set(bad.tolist()))[:5]}: "
            f"each must be -100 (no loss) or a token id in [0, {config.vocab_size})"
        )


def nonfinite_weights(model: torch.nn.Module) -> list[str]:
    """Names of parameters and buffers that hold NaN or infinite values (a damaged weights file)."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return [name for name, t in tensors
            if t.is_floating_point() and t.device.type != "meta" and not torch.isfinite(t).all()]


# -- pipeline arguments -------------------------------------------------------------------------------------------
def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_integer(name: str, value, low: int, high: int | None = None, note: str = "") -> None:
    """An integer (not a bool or a float) in [low, high]."""
    if not _is_integer(value) or value < low or (high is not None and value > high):
        bound = f"≥ {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an integer {bound}{note}, got {value!r}")


def check_number(name: str, value, low: float = 0.0, note: str = "") -> None:
    """A finite real number (not a bool or a string) ≥ low."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not real or value != value or abs(value) == float("inf") or value < low:
        raise ValueError(f"{name} must be a finite number ≥ {low:g}{note}, got {value!r}")


def check_image_size(name: str, value, size: int, grid: int) -> None:
    """A pixel height or width: an integer on the patch grid equal to the model's image size."""
    if not _is_integer(value):
        raise ValueError(f"{name} must be an integer number of pixels ({size} for this model), got {value!r}")
    if value % grid:
        raise ValueError(f"{name}={value} is off the patch grid: it must be a multiple of {grid} (VAE × patch)")
    if value != size:
        raise ValueError(f"{name}={value}: this model generates {size}×{size} images")


def check_generator(generator, images: int, allow_list: bool = True) -> None:
    """None, one torch.Generator, or (where allowed) a list with one per image."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if allow_list and isinstance(generator, list) and len(generator) == images:
        if all(isinstance(g, torch.Generator) for g in generator):
            return
    got = type(generator).__name__
    if isinstance(generator, list):
        got = f"a list of {len(generator)} {sorted({type(g).__name__ for g in generator})}"
    if not allow_list:
        raise ValueError(f"generator must be a torch.Generator or None, got {got}")
    raise ValueError(f"generator must be a torch.Generator, or a list of {images} (one per image), got {got}")


def check_latents(latents, shape: tuple) -> None:
    """Initial noise: a finite tensor of the batch's latent shape."""
    if latents is None:
        return
    if not isinstance(latents, torch.Tensor):
        raise ValueError(f"latents must be a torch.Tensor of shape {shape}, got {type(latents).__name__}")
    if tuple(latents.shape) != shape:
        raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
    if not torch.isfinite(latents).all():
        raise ValueError("latents contain NaN or infinite values")


def check_row_lengths(name: str, lengths, positions: int, reserve: int = 0) -> None:
    """Every encoded row (its length in tokens) leaves room in the model's `positions` for `reserve` more (an image's
    slots), or, with none reserved, for at least one generated token."""
    for i, length in enumerate(int(n) for n in lengths):
        if (length + reserve > positions) if reserve else (length >= positions):
            room = (f"with the {reserve} positions an image needs, it must be at most {positions - reserve}" if reserve
                    else f"it must be shorter than {positions}")  # fmt: skip
            raise ValueError(f"{name} {i} is {length} tokens long: {room} (max_position_embeddings={positions})")


# -- checkpoints ------------------------------------------------------------------------------------------------
def check_local_folder(name_or_path, subfolder: str = "", marker: str = "config.json",
                       what: str = "saved model folder") -> None:
    """A path that names a local folder must be one with its `marker` file; a Hub repo id passes through."""
    text = str(name_or_path)
    path = Path(text) / subfolder if subfolder else Path(text)
    local = Path(text).exists() or text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text
    if not local:
        return
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder: pass a {what} (with {marker}) or a Hub repo id")
    if not (path / marker).is_file():
        raise FileNotFoundError(f"{path} has no {marker}: it is not a {what}")


def check_pipeline_folder(root) -> None:
    """A local pipeline folder, before diffusers reads it: model_index.json and every JSON file under it parse, each
    component it lists has its folder, and the scheduler classes it names exist in diffusers."""
    check_local_folder(root, marker="model_index.json", what="saved pipeline folder")
    root = Path(str(root))
    if not root.is_dir():
        return  # a Hub repo id
    for path in sorted(root.glob("*.json")) + sorted(root.glob("*/*.json")):
        try:
            json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(
                f"{path.relative_to(root)} cannot be read as JSON ({error}) in {root}: "
                "the folder is damaged; re-save it"
            ) from None
    import diffusers

    index = json.loads((root / "model_index.json").read_text())
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or None in entry:
            continue
        if not (root / name).is_dir():
            raise FileNotFoundError(f"{root} has no {name} folder (model_index.json lists a {entry[1]} there)")
    scheduler = root / "scheduler" / "scheduler_config.json"
    names = [("model_index.json", (index.get("scheduler") or [None, None])[1])]
    if scheduler.is_file():
        names.append(("scheduler/scheduler_config.json", json.loads(scheduler.read_text()).get("_class_name")))
    for file, class_name in names:
        if class_name is not None and not hasattr(diffusers, str(class_name)):
            raise ValueError(
                f"{file} names the scheduler class {class_name!r}, which diffusers does not have; name one of "
                "diffusers' schedulers (e.g. DDIMScheduler)"
            )


def weight_files(folder, subfolder: str = "") -> str:
    path = Path(str(folder)) / subfolder
    return ", ".join(sorted(p.name for p in path.glob("*.safetensors"))) if path.is_dir() else str(folder)


def damaged_files(folder) -> str:
    """Names of the .safetensors files in a local folder that cannot be opened."""
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


__all__ = ["check_ids", "check_attention_mask", "check_image_inputs", "check_pixels", "check_labels",
           "nonfinite_weights", "check_integer", "check_number", "check_image_size", "check_generator", "check_latents",
           "check_row_lengths", "check_local_folder", "check_pipeline_folder", "weight_files", "damaged_files",
           "MAX_INFERENCE_STEPS", "MAX_IMAGES_PER_CALL"]
