"""LoRA for TransfusionPipeline through the libraries' own machinery.

An adapter is a PEFT folder (`adapter_config.json` + `adapter_model.safetensors`, keys
`base_model.model.…lora_A.weight`), as written by `training/finetune_lora.py` or any `PeftModel.save_pretrained`.
Loading goes through transformers' `PeftAdapterMixin.load_adapter` on the model (it reads PEFT folders,
`modules_to_save` included); fusing, unfusing, switching and removing go through diffusers' `LoraBaseMixin`, which
handles a transformers model as it handles a text encoder. What this file adds: a shape check that turns an adapter
made for another model into a ValueError naming the module and both sizes, and two things diffusers' text-encoder path
leaves out (see `unload_lora_weights`).
"""

import json
import re
from pathlib import Path

import torch
from diffusers.loaders.lora_base import LoraBaseMixin


class TransfusionLoraLoaderMixin(LoraBaseMixin):
    """`load_lora_weights`, `fuse_lora`, `unfuse_lora`, `unload_lora_weights`, `set_adapters`, `disable_lora`,
    `enable_lora`, `delete_adapters`, `get_active_adapters` for the pipeline's `transformer`."""

    _lora_loadable_modules = ["transformer"]
    transformer_name = "transformer"

    def load_lora_weights(self, pretrained_model_name_or_path, adapter_name: str | None = None, **kwargs) -> None:
        """Load a PEFT LoRA adapter (local folder or Hub repo id) into the transformer and make it the active one.

        Extra keyword arguments go to `transformers.PreTrainedModel.load_adapter` (e.g. `revision`, `token`)."""
        model = self.transformer
        folder = check_adapter(_adapter_folder(pretrained_model_name_or_path, kwargs))
        check_adapter_fits(model, folder)
        adapter_name = adapter_name or ("default" if not getattr(model, "_hf_peft_config_loaded", False) else None)
        if adapter_name is None:
            raise ValueError(
                f"An adapter is loaded already ({sorted(model.peft_config)}): pass adapter_name= for this one"
            )
        if not getattr(model, "_hf_peft_config_loaded", False):
            # PEFT freezes the base weights when it injects an adapter; they are trainable again once it goes
            self._lora_trainable = {n: p.requires_grad for n, p in model.named_parameters()}
        model.load_adapter(str(folder), adapter_name=adapter_name, **kwargs)
        model.set_adapter(adapter_name)

    def fuse_lora(self, components: list[str] | None = None, lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names: list[str] | None = None, **kwargs) -> None:  # fmt: skip
        """Merge the active LoRA adapter(s), scaled by `lora_scale`, into the base weights (diffusers' fuse_lora on
        the transformer). `unload_lora_weights()` afterwards keeps the fused weights and drops the LoRA layers."""
        if not getattr(self.transformer, "_hf_peft_config_loaded", False):
            raise ValueError("No LoRA adapter is loaded: call load_lora_weights(path) before fuse_lora()")
        super().fuse_lora(components=components or self._lora_loadable_modules, lora_scale=lora_scale,
                          safe_fusing=safe_fusing, adapter_names=adapter_names, **kwargs)  # fmt: skip

    def unfuse_lora(self, components: list[str] | None = None, **kwargs) -> None:
        super().unfuse_lora(components=components or self._lora_loadable_modules, **kwargs)

    def unload_lora_weights(self) -> None:
        """Remove every LoRA adapter (diffusers' unload). Un-fused adapters are simply gone; fused ones stay in the
        weights. Two things diffusers' text-encoder path does not do: PEFT `modules_to_save` copies (the fine-tuned
        patch modules) are replaced by the trained copy when fused and by the original otherwise, and the weights
        PEFT froze are as trainable as they were before `load_lora_weights`."""
        from peft.utils.other import AuxiliaryTrainingWrapper

        model = self.transformer
        fused = bool(self._merged_adapters)
        for name, module in list(model.named_modules()):
            if isinstance(module, AuxiliaryTrainingWrapper):
                replacement = (
                    module.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None)
                    if fused else module.original_module)  # fmt: skip
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, replacement)
        super().unload_lora_weights()
        model._hf_peft_config_loaded = False
        trainable = getattr(self, "_lora_trainable", None) or {}
        for name, param in model.named_parameters():
            param.requires_grad_(trainable.get(name, param.requires_grad))
        self._lora_trainable = None
        self._merged_adapters = set()


def _adapter_folder(name_or_path, kwargs: dict) -> Path:
    """A local adapter folder: the path itself, or the adapter files of a Hub repo downloaded to the cache."""
    text = str(name_or_path)
    path = Path(text)
    if path.is_dir() or path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
        return path  # local: check_adapter names what is missing
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name_or_path), revision=kwargs.get("revision"), token=kwargs.get("token"),
                                  allow_patterns=["adapter_config.json", "adapter_model.*"]))  # fmt: skip


def _adapter_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    if (folder / "adapter_model.safetensors").exists():
        from safetensors import safe_open

        with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    raise ValueError(f"{folder} holds no adapter_model.safetensors")


def check_adapter(path) -> Path:
    """The folder of a PEFT adapter that loads as it should: `adapter_config.json` a JSON object naming its
    `target_modules`, `adapter_model.safetensors` complete and finite. Raises FileNotFoundError or ValueError naming the
    folder or file (the pipeline's loader would otherwise fail without the file's name, or load NaN weights)."""
    from safetensors import SafetensorError, safe_open

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"LoRA adapter folder {folder} not found (it should hold adapter_config.json and "
                                "adapter_model.safetensors, as PeftModel.save_pretrained writes)")  # fmt: skip
    config_path, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_path.is_file():
        raise FileNotFoundError(f"LoRA adapter {folder} has no adapter_config.json: it is not a PEFT adapter folder")
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, OSError) as err:
        raise ValueError(
            f"{config_path} is not valid JSON ({err}); write the adapter again with save_pretrained"
        ) from None
    if not isinstance(config, dict) or not config.get("target_modules"):
        raise ValueError(f"{config_path} is not a PEFT LoRA config (a JSON object with target_modules)")
    if not weights.is_file():
        pickled = [p.name for p in folder.glob("adapter_model.bin")]
        why = f"{pickled[0]} is a pickle and is never loaded" if pickled else "it is missing"
        raise FileNotFoundError(f"LoRA adapter {folder} has no adapter_model.safetensors ({why}); save the adapter "
                                "with safetensors (save_pretrained's default)")  # fmt: skip
    try:
        with safe_open(str(weights), framework="pt") as f:
            names = list(f.keys())
            if not names:
                raise ValueError(f"{weights} holds no tensors")
            for name in names:
                if not torch.isfinite(f.get_tensor(name)).all():
                    raise ValueError(f"{weights}: tensor {name} holds NaN or infinite values; the adapter is damaged")
    except (SafetensorError, OSError) as err:  # empty, truncated or not safetensors
        raise ValueError(f"{weights} is not a readable safetensors file ({type(err).__name__}: {err}); the adapter is "
                         "damaged or incomplete: write it again") from None  # fmt: skip
    return folder


def check_adapter_fits(model, folder: Path) -> None:
    """Raise ValueError naming every adapter tensor that does not fit `model` (a module it lacks, another size)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{folder} holds a {config.get('peft_type')} adapter; load_lora_weights loads LoRA adapters")
    # the model's own weights under their plain names (PEFT wrappers of earlier adapters stripped)
    plain = {}
    for key, value in model.state_dict().items():
        key = re.sub(r"\.(base_layer|original_module)(?=\.)|\.modules_to_save\.[^.]+(?=\.)", "", key)
        plain.setdefault(key, tuple(value.shape))
    modules = dict(model.named_modules())
    problems = []
    for key, shape in sorted(_adapter_shapes(folder).items()):
        name = key.removeprefix("base_model.model.")
        match = re.match(r"(.+?)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?(?:\.weight)?$", name)
        if match is None:  # a full module saved through modules_to_save
            if name not in plain:
                problems.append(f"{name}: this model has no such weight")
            elif plain[name] != shape:
                problems.append(f"{name}: adapter {list(shape)} vs model {list(plain[name])}")
            continue
        module_name, part = match.groups()
        module = modules.get(module_name)
        weight = getattr(getattr(module, "base_layer", module), "weight", None)
        if weight is None:
            problems.append(f"{module_name}: the adapter adapts it, this model has no such layer")
            continue
        # lora_A reads the layer's input, lora_B writes its output (embedding LoRA the other way round)
        axis, got, side = {
            "lora_A": (1, shape[1], "input"),
            "lora_B": (0, shape[0], "output"),
            "lora_embedding_A": (0, shape[1], "vocabulary"),
            "lora_embedding_B": (1, shape[0], "embedding"),
        }[part]
        if weight.shape[axis] != got:
            problems.append(f"{module_name}: adapter {part} {list(shape)} needs {side} size {got}, "
                            f"the layer has {weight.shape[axis]}")  # fmt: skip
    if problems:
        shown = "; ".join(problems[:6]) + (f"; … {len(problems) - 6} more" if len(problems) > 6 else "")
        base = config.get("base_model_name_or_path")
        raise ValueError(f"The LoRA adapter in {folder} does not fit this model"
                         + (f" (it was trained on {base})" if base else "") + f": {shown}")  # fmt: skip
