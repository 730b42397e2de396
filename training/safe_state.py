"""Training state in safe formats: tensors in safetensors, everything else as JSON in the same file's metadata.

A pickle (`torch.load(..., weights_only=False)`) runs whatever code the file names, so a resumable run never reads one:
model and optimizer state, step counters and RNG states all fit in tensors and JSON.

    save_state(path, {"vae": vae.state_dict()}, optimizers={"optimizer": opt.state_dict()}, meta={"step": 10})
    tensors, optimizers, meta = load_state(path)
"""

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

_META_KEY = "training_state"


def _flatten_optimizer(name: str, state: dict, tensors: dict) -> dict:
    """An optimizer's `state_dict()` → its JSON part; its tensors go into `tensors` under `name.<param>.<key>`."""
    per_param = {}
    for param_id, entries in state["state"].items():
        per_param[str(param_id)] = {}
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{name}.{param_id}.{key}"] = value.detach().cpu().contiguous()
                per_param[str(param_id)][key] = {"tensor": f"{name}.{param_id}.{key}"}
            else:
                per_param[str(param_id)][key] = {"value": value}
    return {"state": per_param, "param_groups": state["param_groups"]}


def _unflatten_optimizer(saved: dict, tensors: dict) -> dict:
    state = {  # ids are ints, or parameter names (FSDP's full optimizer state dict)
        int(param_id) if param_id.isdigit() else param_id: {
            key: tensors[v["tensor"]] if "tensor" in v else v["value"] for key, v in entries.items()
        }
        for param_id, entries in saved["state"].items()
    }
    return {"state": state, "param_groups": saved["param_groups"]}


def save_state(path, modules: dict[str, dict], optimizers: dict[str, dict] | None = None,
               meta: dict | None = None) -> None:
    """Write state dicts (`modules`: name → state dict), optimizer state dicts and JSON `meta` to one safetensors
    file, atomically: a crash leaves the previous file in place, never a half-written one."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for name, state_dict in modules.items():
        for key, value in state_dict.items():
            tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
    saved_optimizers = {name: _flatten_optimizer(f"optim/{name}", s, tensors) for name, s in (optimizers or {}).items()}
    header = {"modules": sorted(modules), "optimizers": saved_optimizers, "meta": meta or {}}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(header)})
    os.replace(tmp, path)


def load_state(path) -> tuple[dict[str, dict], dict[str, dict], dict]:
    """Read what `save_state` wrote: (module state dicts, optimizer state dicts, meta). Raises ValueError naming the
    file when it is not such a file or is damaged."""
    path = Path(path)
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {})[_META_KEY])
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as error:
        raise ValueError(f"{path} is not a readable training state ({error}); delete it to start over") from error
    try:
        modules = {name: {} for name in header["modules"]}
        for key, value in tensors.items():
            name, _, param = key.partition("/")
            if name in modules:
                modules[name][param] = value
        optimizers = {name: _unflatten_optimizer(saved, tensors) for name, saved in header["optimizers"].items()}
        return modules, optimizers, header["meta"]
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(
            f"{path} is not a readable training state (its metadata lacks {error}); delete it to start over"
        ) from None


__all__ = ["save_state", "load_state"]
