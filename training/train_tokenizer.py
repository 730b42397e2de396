"""Train the byte-level BPE tokenizer on the text corpus (train split) plus every image caption.

The captions are repeated many times so that their words ("sneaker", "triangle", "to the left of") become single
tokens: a caption then costs a handful of tokens, not a dozen.

    python -m training.train_tokenizer --vocab-size 2048 --out checkpoints/tokenizer
"""

import argparse
import os
from pathlib import Path

import torch

from modeling_transfusion.tokenization_transfusion import build_tokenizer
from training.datasets import all_captions, text_corpus


def tokenizer_texts(caption_repeats: int) -> list[str]:
    """The training texts: corpus train chunks, then all captions `caption_repeats` times (deterministic order)."""
    return text_corpus("train") + all_captions() * caption_repeats


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--out", default="checkpoints/tokenizer", help="folder for save_pretrained")
    p.add_argument("--caption-repeats", type=int, default=50, help="how many times every caption is added")
    p.add_argument("--threads", type=int, default=int(os.environ.get("TRANSFUSION_THREADS", "1")))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # the tokenizers thread pool, created on first use
    torch.set_num_threads(args.threads)
    texts = tokenizer_texts(args.caption_repeats)
    tokenizer = build_tokenizer(texts, vocab_size=args.vocab_size)
    out = Path(args.out)
    tokenizer.save_pretrained(out)
    sample = "a photo of a ankle boot"
    print(f"vocabulary {len(tokenizer)} tokens from {len(texts)} texts; {sample!r} → {tokenizer.tokenize(sample)}")
    print(f"wrote the tokenizer to {out}/")
    return tokenizer


if __name__ == "__main__":
    main()
