"""diffusers pipelines built on the transformers Transfusion model."""

import modeling_transfusion  # noqa: F401  (registers the Auto classes used when loading a saved pipeline)

from .pipeline_transfusion import InterleavedOutput, TransfusionPipeline, TransfusionPipelineOutput

__all__ = ["TransfusionPipeline", "TransfusionPipelineOutput", "InterleavedOutput"]
