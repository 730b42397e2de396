"""Short scheduler names for command lines (evaluation/evaluate.py, conversion/export_pipeline.py), checked against
the model's diffusion type. The pipeline itself takes any diffusers scheduler object."""

import inspect

SCHEDULER_NAMES = {  # short name (CLI flags) → diffusers class; a flow-matching model samples with flow-euler only
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "flow-euler": "FlowMatchEulerDiscreteScheduler",
}


def scheduler_class(name: str, diffusion_type: str):
    """The diffusers scheduler class `name` stands for (see SCHEDULER_NAMES), checked against the model's diffusion
    type; for a flow-matching model "euler" means flow-euler."""
    import diffusers

    if name not in SCHEDULER_NAMES:
        raise ValueError(f"scheduler {name!r}; expected one of {sorted(SCHEDULER_NAMES)}")
    flow = diffusion_type == "flow_matching"
    name = "flow-euler" if flow and name == "euler" else name
    if (name == "flow-euler") != flow:
        raise ValueError(f"scheduler {name!r} does not fit a {diffusion_type} model; use "
                         f"{'flow-euler' if flow else 'ddim, ddpm, dpm or euler'}")  # fmt: skip
    return getattr(diffusers, SCHEDULER_NAMES[name])


def scheduler_arguments(scheduler) -> set[str]:
    """The config keys the scheduler's class takes. A diffusers config can also carry keys of the scheduler it was
    converted from, which the class ignores (a DDIM built from a DPM-Solver config keeps `algorithm_type`)."""
    return set(inspect.signature(type(scheduler).__init__).parameters) - {"self", "kwargs"}


def reconfigure_scheduler(scheduler, overrides: dict):
    """A new scheduler of the same class with `overrides` of its config, e.g. {"algorithm_type": "sde-dpmsolver++"};
    keys are checked against the class's own arguments (`scheduler_arguments`)."""
    accepted = scheduler_arguments(scheduler)
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ValueError(f"scheduler config overrides {unknown} are not in {type(scheduler).__name__}'s config; "
                         f"it takes {sorted(accepted)}")  # fmt: skip
    return type(scheduler).from_config(scheduler.config, **overrides)


__all__ = ["SCHEDULER_NAMES", "scheduler_class", "scheduler_arguments", "reconfigure_scheduler"]
