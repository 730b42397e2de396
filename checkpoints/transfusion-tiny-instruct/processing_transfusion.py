"""TransfusionProcessor: interleaved text and images → model inputs. The one owner of the sequence layout.

A row is a list of items, each a string or an image. Text is tokenised without special tokens (a user's "<|image|>"
stays plain text); an image becomes `<|boi|>` + `image_slots` × `<|image|>` + `<|eoi|>`. Every row starts with
`<|bos|>`. Images are given as pixels (PIL, numpy HWC uint8, or a (3, H, W) tensor in [−1, 1]) and come back as
`pixel_values`, or — with `images_as_latents=True` — as VAE latents (C, h, w) that come back as `image_latents`
(a training collator holds latents already and needs no pixels). Both are stacked in row-major order.

A conversation is a row too: a list of messages `{"role": "user" | "assistant", "content": item or [items]}`, laid
out as `user:` + content and `assistant:` + content + `<|eos|>` (the end of a turn), so a model trained on them answers
a turn and stops (`add_generation_prompt=True` ends the row with `assistant:`, for the model to answer). In a
conversation the user's images are inputs and the assistant's images are generated; only the last generated image of a
row is trained as generated (`return_image_inputs`), the earlier ones are context that later turns read clean.

Pixel preprocessing (`prepare_image`): EXIF orientation applied, transparency composited on the background colour
(the training images have black backgrounds), the aspect ratio kept by padding to a square with that colour, then
resized to `image_size` and scaled to [−1, 1].
"""

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import ImageOps
from transformers import BatchFeature, ProcessorMixin

# Modes PIL converts to RGB without guessing a value range; 16/32-bit and float images are refused.
SUPPORTED_IMAGE_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
CHAT_ROLES = ("user", "assistant")


def is_conversation(row) -> bool:
    """Whether a row is a conversation (a list of {"role", "content"} messages) rather than a list of items."""
    return isinstance(row, (list, tuple)) and bool(row) and all(isinstance(m, dict) and "role" in m for m in row)


def prepare_image(image, image_size: int, background=(0, 0, 0)) -> tuple[PIL.Image.Image, list[str]]:
    """A PIL image or uint8 numpy array → an RGB `image_size`² PIL image, and the steps taken (for a UI's note).

    Raises ValueError naming the problem for what cannot be converted (type, dtype, mode, an empty image)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise ValueError(
                "A numpy image must be uint8 HW or HWC with 1, 3 or 4 channels, "
                f"got dtype {image.dtype} shape {image.shape}"
            )
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        image = PIL.Image.fromarray(image)
    if not isinstance(image, PIL.Image.Image):
        raise ValueError(f"Unsupported image type {type(image).__name__}; pass a PIL image, a uint8 array or a tensor")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image is empty (size {image.width}×{image.height}); an image needs at least 1×1 pixels")
    if image.mode not in SUPPORTED_IMAGE_MODES:
        raise ValueError(
            f"Unsupported image mode {image.mode!r}; convert it to 'RGB' or 'L' first "
            f"(supported: {SUPPORTED_IMAGE_MODES})"
        )
    steps = []
    transposed = ImageOps.exif_transpose(image)  # phone photos store their rotation in EXIF
    if transposed is not None and transposed.size != image.size:
        steps.append("rotated as its EXIF orientation says")
    image = transposed if transposed is not None else image
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        flat = PIL.Image.new("RGBA", image.size, (*background, 255))
        image = PIL.Image.alpha_composite(flat, image.convert("RGBA"))
        steps.append(f"transparency on {'black' if tuple(background) == (0, 0, 0) else f'rgb{tuple(background)}'}")
    image = image.convert("RGB")
    if image.size != (image_size, image_size):
        if image.width != image.height:
            steps.append("padded to a square")
        image = ImageOps.pad(image, (image_size, image_size), method=PIL.Image.Resampling.LANCZOS, color=background)
    return image, steps


class TransfusionProcessor(ProcessorMixin):
    r"""
    Wraps the tokenizer and the image preprocessing of a Transfusion model.

    Args:
        tokenizer: a tokenizer with the `<|bos|> <|eos|> <|pad|> <|boi|> <|eoi|> <|image|>` special tokens.
        image_size: pixel height/width the VAE takes (`config.image_size`).
        image_slots: sequence positions per image (`config.image_slots`).
        background: RGB colour for transparency and padding (the training images' background).
    """

    tokenizer_class = "AutoTokenizer"

    def __init__(self, tokenizer=None, image_size: int = 32, image_slots: int = 16, background=(0, 0, 0),
                 chat_template=None, **kwargs):  # fmt: skip
        self.image_size = image_size
        self.image_slots = image_slots
        self.background = tuple(background)
        self.image_processor_ = VaeImageProcessor(vae_scale_factor=1, do_resize=False)
        super().__init__(tokenizer, chat_template=chat_template)

    @classmethod
    def from_model_config(cls, tokenizer, config) -> "TransfusionProcessor":
        return cls(tokenizer=tokenizer, image_size=config.image_size, image_slots=config.image_slots)

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"The tokenizer has no {token} token; build it with build_tokenizer()")
        return token_id

    @property
    def special_ids(self) -> dict[str, int]:
        """bos/eos/pad as the tokenizer declares them (a converted Llama tokenizer keeps its `<s>`, `</s>`), the image
        tokens by name."""
        image_tokens = [("boi", "<|boi|>"), ("eoi", "<|eoi|>"), ("image", "<|image|>")]
        ids = {name: self._token_id(tok) for name, tok in image_tokens}
        for name in ("bos", "eos", "pad"):
            declared = getattr(self.tokenizer, f"{name}_token_id", None)
            ids[name] = declared if declared is not None else self._token_id(f"<|{name}|>")
        return ids

    @property
    def image_slot_ids(self) -> list[int]:
        """The `<|image|>` ids of one image's slots (between `<|boi|>` and `<|eoi|>`)."""
        return [self.special_ids["image"]] * self.image_slots

    def encode_text(self, text: str) -> list[int]:
        """Token ids of plain text; special-token strings in user text are not parsed as special tokens."""
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def prepare_image(self, image) -> tuple[PIL.Image.Image, list[str]]:
        """A PIL image or uint8 array → the RGB image the model sees, and the steps taken (see `prepare_image`)."""
        return prepare_image(image, self.image_size, self.background)

    def preprocess_image(self, image) -> torch.Tensor:
        """One image → (3, image_size, image_size) float in [−1, 1] (see `prepare_image`). A tensor is taken as
        already in [−1, 1] and only resized."""
        if isinstance(image, torch.Tensor):
            if image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"An image tensor must be (3, H, W) in [-1, 1], got shape {tuple(image.shape)}")
            if 0 in image.shape:
                raise ValueError(f"image is empty (shape {tuple(image.shape)}); an image needs at least 1×1 pixels")
            if not torch.isfinite(image).all():
                raise ValueError("An image tensor contains NaN or infinite values")
            low, high = float(image.min()), float(image.max())
            if low < -1.001 or high > 1.001:
                raise ValueError("An image tensor must be (3, H, W) in [-1, 1], got values in "
                                 f"[{low:.3g}, {high:.3g}]; pass uint8 images as PIL or numpy")  # fmt: skip
            if image.shape[1:] != (self.image_size, self.image_size):
                size = (self.image_size, self.image_size)
                image = torch.nn.functional.interpolate(image[None].float(), size=size, mode="bilinear")[0]
            return image.float().clamp(-1, 1)
        image, _ = prepare_image(image, self.image_size, self.background)
        return self.image_processor_.preprocess(image)[0]

    def _encode_row(self, row, add_eos: bool, ids: dict, images_as_latents: bool):
        """One row → (token ids, image tensors, per image: whether it is an input rather than generated)."""
        if is_conversation(row):
            return self._encode_conversation(row, add_eos, ids, images_as_latents)
        items = (str, PIL.Image.Image, np.ndarray, torch.Tensor)
        if isinstance(row, items):
            row = [row]
        if not isinstance(row, (list, tuple)) or not all(isinstance(item, items) for item in row):
            got = type(row).__name__ if not isinstance(row, (list, tuple)) else [type(item).__name__ for item in row]
            raise ValueError(
                "A row is a string, an image (PIL, uint8 array or tensor), a list of them, or a conversation (a list "
                f'of {{"role": "user" | "assistant", "content": ...}} messages); a batch is a list of rows. Got {got}'
            )
        tokens, images = [ids["bos"]], []
        self._encode_items(row, tokens, images, ids, images_as_latents)
        if add_eos:
            tokens.append(ids["eos"])
        return tokens, images, [False] * len(images)

    def _encode_items(self, row, tokens: list, images: list, ids: dict, images_as_latents: bool) -> None:
        """Append the tokens and image tensors of a list of strings and images."""
        for item in row:
            if isinstance(item, str):
                tokens += self.encode_text(item)
                continue
            if images_as_latents:
                if not isinstance(item, torch.Tensor) or item.ndim != 3:
                    raise ValueError(f"With images_as_latents=True an image is a latent tensor (C, h, w), got "
                                     f"{type(item).__name__}{tuple(getattr(item, 'shape', ()))}")  # fmt: skip
                images.append(item)
            else:
                images.append(self.preprocess_image(item))
            tokens += [ids["boi"], *self.image_slot_ids, ids["eoi"]]

    def _encode_conversation(self, messages, add_eos: bool, ids: dict, images_as_latents: bool):
        """`user:` content, `assistant:` content `<|eos|>`, … ; the user's images and every assistant image but the last
        are inputs. A conversation that ends with a user turn is left open at `assistant:` (a generation prompt)."""
        items = (str, PIL.Image.Image, np.ndarray, torch.Tensor)
        tokens, images, inputs = [ids["bos"]], [], []
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            content = [content] if isinstance(content, items) else content
            if role not in CHAT_ROLES or not isinstance(content, (list, tuple)) or not content or not all(
                    isinstance(item, items) for item in content):  # fmt: skip
                raise ValueError(
                    f'message {i} of a conversation is {message!r}; a message is {{"role": "user" | "assistant", '
                    '"content": a string, an image, or a non-empty list of them}'
                )
            tokens += self.encode_text(f"{role}:")
            before = len(images)
            self._encode_items(content, tokens, images, ids, images_as_latents)
            inputs += [True] * (len(images) - before) if role == "user" else [False] * (len(images) - before)
            if role == "assistant":
                tokens.append(ids["eos"])  # the end of a turn
        generated = [k for k, is_input in enumerate(inputs) if not is_input]
        inputs = [is_input or k != generated[-1] for k, is_input in enumerate(inputs)] if generated else inputs
        if messages[-1].get("role") == "user":
            tokens += self.encode_text("assistant:")  # the model answers from here
        elif not add_eos:
            tokens.pop()  # an assistant turn to continue: no end of turn yet
        return tokens, images, inputs

    def conversation_prompt(self, messages) -> list:
        """Check a conversation for generation: it must end with a user turn (the row then ends at `assistant:`)."""
        if not is_conversation(messages) or messages[-1].get("role") != "user":
            raise ValueError(
                'messages must be a non-empty list of {"role": "user" | "assistant", "content": ...} dicts ending '
                f"with a user turn, got {messages!r}"
            )
        return messages

    def pad(self, rows: list[list[int]], padding_side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
        """Token rows → (B, L) `input_ids` padded with `<|pad|>` on `padding_side`, and the attention mask."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.special_ids["pad"], dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, tokens in enumerate(rows):
            span = slice(length - len(tokens), length) if padding_side == "left" else slice(0, len(tokens))
            input_ids[i, span] = torch.as_tensor(tokens, dtype=torch.long)
            attention_mask[i, span] = 1
        return input_ids, attention_mask

    def labels(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """LM labels: the ids, with −100 (no loss) on image slots, `<|eoi|>` and padding."""
        ids = self.special_ids
        ignore = (input_ids == ids["image"]) | (input_ids == ids["eoi"]) | (attention_mask == 0)
        return input_ids.masked_fill(ignore, -100)

    def __call__(
        self,
        inputs,
        add_eos: bool = False,
        append_boi: bool = False,
        padding_side: str = "right",
        return_labels: bool = False,
        images_as_latents: bool = False,
        return_image_inputs: bool = False,
        return_tensors: str = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Encode one row (a string, an image, or a list of them) or a batch (a list of rows).

        `append_boi` ends every row with `<|boi|>` (a text→image prompt); `add_eos` ends it with `<|eos|>` (training).
        Rows are padded with `<|pad|>` on `padding_side` ("left" for generation). `return_labels` adds `labels`
        (see `labels`). Images become `pixel_values` (N, 3, S, S), or with `images_as_latents=True` the items are
        latents (C, h, w) and become `image_latents` (N, C, h, w). `return_image_inputs` adds `image_is_input` (N,):
        True for an image the row gives (a user's image in a conversation, or an assistant image a later turn reads),
        False for one to train as generated (every image of a plain row).
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if isinstance(inputs, (list, tuple)) and (
            not inputs or any(isinstance(r, (list, tuple)) and not r for r in inputs)
        ):
            raise ValueError("Nothing to encode: the input (or one of its rows) is an empty list")
        is_batch = isinstance(inputs, list) and not is_conversation(inputs) and any(
            isinstance(r, (list, tuple)) for r in inputs
        )
        rows = inputs if is_batch else [inputs]
        ids = self.special_ids
        encoded = [self._encode_row(r, add_eos, ids, images_as_latents) for r in rows]
        tokens = [t + [ids["boi"]] if append_boi else t for t, _, _ in encoded]
        input_ids, attention_mask = self.pad(tokens, padding_side)
        data = {"input_ids": input_ids, "attention_mask": attention_mask}
        images = [image for _, row_images, _ in encoded for image in row_images]
        if images:
            data["image_latents" if images_as_latents else "pixel_values"] = torch.stack(images)
            if return_image_inputs:
                data["image_is_input"] = torch.tensor([flag for _, _, flags in encoded for flag in flags])
        if return_labels:
            data["labels"] = self.labels(input_ids, attention_mask)
        return BatchFeature(data, tensor_type=return_tensors)

    def decode(self, token_ids, skip_special_tokens: bool = True, **kwargs) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    def postprocess_images(self, pixels: torch.Tensor, output_type: str = "pil"):
        """(N, 3, H, W) in [−1, 1] → PIL images, numpy or tensors (diffusers' conventions)."""
        return self.image_processor_.postprocess(pixels, output_type=output_type)


TransfusionProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["CHAT_ROLES", "TransfusionProcessor", "SUPPORTED_IMAGE_MODES", "is_conversation", "prepare_image"]
