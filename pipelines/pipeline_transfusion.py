"""Where the pipeline used to live; it is now `modeling_transfusion.pipeline_transfusion` (shipped with the model
code). Kept so existing imports work."""

from modeling_transfusion.pipeline_transfusion import InterleavedOutput, TransfusionPipeline, TransfusionPipelineOutput
from modeling_transfusion.scheduling_transfusion import (
    SCHEDULER_NAMES,
    reconfigure_scheduler,
    scheduler_arguments,
    scheduler_class,
)

__all__ = ["TransfusionPipeline", "TransfusionPipelineOutput", "InterleavedOutput", "SCHEDULER_NAMES",
           "scheduler_class", "scheduler_arguments", "reconfigure_scheduler"]  # fmt: skip
