"""TransfusionProcessor: interleaved text and images → model inputs.

A row is a list of items, each a string or an image (PIL, numpy HWC uint8, or a (3, H, W) tensor in [−1, 1]).
Text is tokenised without special tokens (a user's "<|image|>" stays plain text); an image becomes
`<|boi|>` + `image_slots` × `<|image|>` + `<|eoi|>` and its pixels go to `pixel_values` in row-major order.
"""

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor
from transformers import BatchFeature, ProcessorMixin

# Modes PIL converts to RGB without guessing a value range; 16/32-bit and float images are refused.
SUPPORTED_IMAGE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")


def to_pixel_tensor(image, image_size: int, image_processor: VaeImageProcessor) -> torch.Tensor:
    """One image → (3, image_size, image_size) float in [−1, 1]. Raises ValueError for what cannot be converted."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"An image tensor must be (3, H, W) in [-1, 1], got shape {tuple(image.shape)}")
        if image.shape[1:] != (image_size, image_size):
            image = torch.nn.functional.interpolate(image[None].float(), size=(image_size, image_size), mode="bilinear")[0]
        return image.float().clamp(-1, 1)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"A numpy image must be uint8 HW or HWC, got dtype {image.dtype} shape {image.shape}")
        image = PIL.Image.fromarray(image)
    if not isinstance(image, PIL.Image.Image):
        raise ValueError(f"Unsupported image type {type(image).__name__}; pass a PIL image, a uint8 array or a tensor")
    if image.mode not in SUPPORTED_IMAGE_MODES:
        raise ValueError(
            f"Unsupported image mode {image.mode!r}; convert it to 'RGB' or 'L' first (supported: {SUPPORTED_IMAGE_MODES})"
        )
    if image.width < 1 or image.height < 1:
        raise ValueError(f"Empty image of size {image.size}")
    image = image.convert("RGB")
    return image_processor.preprocess(image, height=image_size, width=image_size)[0]


class TransfusionProcessor(ProcessorMixin):
    r"""
    Wraps the tokenizer and the image preprocessing of a Transfusion model.

    Args:
        tokenizer: a tokenizer with the `<|bos|> <|eos|> <|pad|> <|boi|> <|eoi|> <|image|>` special tokens.
        image_size: pixel height/width the VAE takes (`config.image_size`).
        image_slots: sequence positions per image (`config.image_slots`).
    """

    tokenizer_class = "AutoTokenizer"

    def __init__(self, tokenizer=None, image_size: int = 32, image_slots: int = 16, chat_template=None, **kwargs):
        self.image_size = image_size
        self.image_slots = image_slots
        self.image_processor_ = VaeImageProcessor(vae_scale_factor=1, do_resize=True, resample="bicubic")
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
        ids = {name: self._token_id(tok) for name, tok in [("boi", "<|boi|>"), ("eoi", "<|eoi|>"), ("image", "<|image|>")]}
        for name in ("bos", "eos", "pad"):
            declared = getattr(self.tokenizer, f"{name}_token_id", None)
            ids[name] = declared if declared is not None else self._token_id(f"<|{name}|>")
        return ids

    def encode_text(self, text: str) -> list[int]:
        """Token ids of plain text; special-token strings in user text are not parsed as special tokens."""
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def _encode_row(self, row, add_eos: bool, ids: dict) -> tuple[list[int], list[torch.Tensor]]:
        if isinstance(row, (str, PIL.Image.Image, np.ndarray, torch.Tensor)):
            row = [row]
        tokens, pixels = [ids["bos"]], []
        for item in row:
            if isinstance(item, str):
                tokens += self.encode_text(item)
            else:
                pixels.append(to_pixel_tensor(item, self.image_size, self.image_processor_))
                tokens += [ids["boi"]] + [ids["image"]] * self.image_slots + [ids["eoi"]]
        if add_eos:
            tokens.append(ids["eos"])
        return tokens, pixels

    def __call__(
        self,
        inputs,
        add_eos: bool = False,
        append_boi: bool = False,
        padding_side: str = "right",
        return_labels: bool = False,
        return_tensors: str = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Encode one row (a string, an image, or a list of them) or a batch (a list of rows).

        `append_boi` ends every row with `<|boi|>` (a text→image prompt); `add_eos` ends it with `<|eos|>` (training).
        Rows are padded with `<|pad|>` on `padding_side` ("left" for generation). `return_labels` adds `labels`:
        the ids with −100 on image slots, `<|eoi|>` and padding.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if isinstance(inputs, (list, tuple)) and (not inputs or any(isinstance(r, (list, tuple)) and not r for r in inputs)):
            raise ValueError("Nothing to encode: the input (or one of its rows) is an empty list")
        is_batch = isinstance(inputs, list) and any(isinstance(r, (list, tuple)) for r in inputs)
        rows = inputs if is_batch else [inputs]
        ids = self.special_ids
        encoded = [self._encode_row(r, add_eos, ids) for r in rows]
        if append_boi:
            encoded = [(t + [ids["boi"]], p) for t, p in encoded]
        length = max(len(t) for t, _ in encoded)
        input_ids = torch.full((len(rows), length), ids["pad"], dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (tokens, _) in enumerate(encoded):
            span = slice(length - len(tokens), length) if padding_side == "left" else slice(0, len(tokens))
            input_ids[i, span] = torch.tensor(tokens)
            attention_mask[i, span] = 1
        data = {"input_ids": input_ids, "attention_mask": attention_mask}
        pixels = [p for _, row_pixels in encoded for p in row_pixels]
        if pixels:
            data["pixel_values"] = torch.stack(pixels)
        if return_labels:
            ignore = (input_ids == ids["image"]) | (input_ids == ids["eoi"]) | (attention_mask == 0)
            data["labels"] = input_ids.masked_fill(ignore, -100)
        return BatchFeature(data, tensor_type=return_tensors)

    def decode(self, token_ids, skip_special_tokens: bool = True, **kwargs) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    def postprocess_images(self, pixels: torch.Tensor, output_type: str = "pil"):
        """(N, 3, H, W) in [−1, 1] → PIL images, numpy or tensors (diffusers' conventions)."""
        return self.image_processor_.postprocess(pixels, output_type=output_type)


TransfusionProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["TransfusionProcessor", "SUPPORTED_IMAGE_MODES", "to_pixel_tensor"]
