"""Experiments run with the library and judged by evaluation/: ablations, the LoRA concept experiment, LMFusion."""
