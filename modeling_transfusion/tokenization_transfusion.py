"""Byte-level BPE tokenizer for Transfusion, trained from text with the `tokenizers` library.

The special tokens are fixed and come first in the vocabulary, in this order, so their ids are stable across
tokenizers of any size: <|bos|>=0, <|eos|>=1, <|pad|>=2, <|boi|>=3, <|eoi|>=4, <|image|>=5.
"""

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {
    "bos_token": "<|bos|>",
    "eos_token": "<|eos|>",
    "pad_token": "<|pad|>",
    "boi_token": "<|boi|>",
    "eoi_token": "<|eoi|>",
    "image_token": "<|image|>",
}


def build_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and wrap it as a transformers tokenizer with the Transfusion special tokens.

    Every byte is in the base alphabet, so any string round-trips through encode/decode.
    """
    specials = list(SPECIAL_TOKENS.values())
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least {256 + len(specials)}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=SPECIAL_TOKENS["bos_token"],
        eos_token=SPECIAL_TOKENS["eos_token"],
        pad_token=SPECIAL_TOKENS["pad_token"],
        extra_special_tokens={
            "boi_token": SPECIAL_TOKENS["boi_token"],
            "eoi_token": SPECIAL_TOKENS["eoi_token"],
            "image_token": SPECIAL_TOKENS["image_token"],
        },
        model_max_length=4096,
    )
