"""Transfusion for transformers: config, model, processor, registered with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_transfusion import PRESETS, TransfusionConfig
from .diffusion_transfusion import TransfusionDiffusionObjective, TransfusionObjectiveOutput
from .modeling_transfusion import (
    TransfusionCausalLMOutputWithPast,
    TransfusionForCausalLM,
    TransfusionModel,
    TransfusionModelOutputWithPast,
    TransfusionPreTrainedModel,
    crop_cache,
    image_block_ids,
    transfusion_attention_mask,
)

AutoConfig.register("transfusion", TransfusionConfig, exist_ok=True)
AutoModel.register(TransfusionConfig, TransfusionModel, exist_ok=True)
AutoModelForCausalLM.register(TransfusionConfig, TransfusionForCausalLM, exist_ok=True)

__all__ = [
    "PRESETS",
    "TransfusionConfig",
    "TransfusionDiffusionObjective",
    "TransfusionObjectiveOutput",
    "TransfusionModel",
    "TransfusionForCausalLM",
    "TransfusionPreTrainedModel",
    "TransfusionModelOutputWithPast",
    "TransfusionCausalLMOutputWithPast",
    "crop_cache",
    "image_block_ids",
    "transfusion_attention_mask",
]

from transformers import AutoProcessor  # noqa: E402

from .processing_transfusion import TransfusionProcessor  # noqa: E402
from .tokenization_transfusion import build_tokenizer  # noqa: E402

AutoProcessor.register(TransfusionConfig, TransfusionProcessor, exist_ok=True)
__all__ += ["TransfusionProcessor", "build_tokenizer"]

from .pipeline_transfusion import ChatOutput, InterleavedOutput, TransfusionPipeline, TransfusionPipelineOutput  # noqa: E402

__all__ += ["TransfusionPipeline", "TransfusionPipelineOutput", "InterleavedOutput", "ChatOutput"]
