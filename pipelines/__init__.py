"""The diffusers pipeline, re-exported from the model package (where it ships with the model code)."""

from modeling_transfusion.pipeline_transfusion import (
    ChatOutput,
    InterleavedOutput,
    TransfusionPipeline,
    TransfusionPipelineOutput,
)

__all__ = ["TransfusionPipeline", "TransfusionPipelineOutput", "InterleavedOutput", "ChatOutput"]
