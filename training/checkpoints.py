"""Training checkpoints: accelerate `save_state` folders with a checksum manifest, written atomically and pruned;
the counters saved with them; the final `save_pretrained` export; resume resolution.

A checkpoint ``<output-dir>/checkpoints/step-N`` is written as ``step-N.tmp`` and renamed once complete, so a kill
mid-save leaves the previous checkpoint as the latest; `verify_checkpoint` names the first missing or damaged file.
"""

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

CHECKPOINT_PREFIX = "step-"
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (missing, damaged or incompatible); the message names the file."""


@dataclass
class TrainState:
    """Counters saved with every checkpoint (registered with accelerate)."""

    step: int = 0
    tokens: int = 0
    examples: int = 0
    train_seconds: float = 0.0
    global_batch: int = 0
    batch_size: int = 0
    seed: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (folder / MANIFEST).write_text(json.dumps({"files": entries}, indent=1))


def verify_checkpoint(folder: Path) -> None:
    """Raise CheckpointError naming the first missing or damaged file of a checkpoint (checked against its manifest)."""
    manifest = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist")
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint manifest {manifest} is missing or unreadable ({err}); the checkpoint is incomplete") from None
    hint = f"delete {folder} to resume from the previous checkpoint, or start without --resume"
    for name, info in entries.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing; {hint}")
        if path.stat().st_size != info["size"] or _sha256(path) != info["sha256"]:
            raise CheckpointError(f"checkpoint file {path} is corrupted (its checksum differs from {manifest}); {hint}")


def list_checkpoints(root: Path) -> list[Path]:
    found = []
    for p in root.glob(f"{CHECKPOINT_PREFIX}*") if root.is_dir() else []:
        suffix = p.name[len(CHECKPOINT_PREFIX) :]
        if p.is_dir() and suffix.isdigit():
            found.append((int(suffix), p))
    return [p for _, p in sorted(found)]


def save_checkpoint(accelerator, root: Path, step: int, keep: int) -> Path:
    """accelerate `save_state` into step-N.tmp, a checksum manifest, then an atomic rename to step-N; prune to `keep`."""
    final, tmp = root / f"{CHECKPOINT_PREFIX}{step}", root / f"{CHECKPOINT_PREFIX}{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_manifest(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_final(accelerator, model, tokenizer, processor, out: Path) -> None:
    """`save_pretrained` of the model, tokenizer and processor into `out` (written aside, then swapped in)."""
    state_dict = accelerator.get_state_dict(model)  # collective under FSDP / DeepSpeed
    if accelerator.is_main_process:
        tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict, save_function=accelerator.save)
        tokenizer.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def portable_model_hooks(accelerator) -> None:
    """Save and load the unwrapped model's weights (no DDP `module.` prefix) so a checkpoint resumes under any number
    of processes. FSDP and DeepSpeed save their own sharded formats and are left alone."""
    from safetensors.torch import load_model

    def save_hook(models, weights, output_dir):
        for i, model in enumerate(models[: len(weights)]):
            weights[i] = accelerator.unwrap_model(model).state_dict()

    def load_hook(models, input_dir):
        for i, model in enumerate(models):
            path = Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
            load_model(accelerator.unwrap_model(model), str(path), device="cpu")
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def resolve_resume(args, ckpt_root: Path) -> Path | None:
    existing = list_checkpoints(ckpt_root)
    if args.resume is None:
        if existing:
            raise CheckpointError(
                f"{args.output_dir} already holds checkpoints (latest {existing[-1]}); pass --resume to continue that run, "
                "or choose another --output-dir"
            )
        return None
    if args.resume == "auto":
        return existing[-1] if existing else None
    path = Path(args.resume)
    if not path.is_dir():
        raise CheckpointError(f"--resume {path}: no such checkpoint folder")
    return path

