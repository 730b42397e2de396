"""Training checkpoints in safetensors + JSON, with a checksum manifest, written atomically and pruned; the counters
saved with them; the final `save_pretrained` export; resume resolution.

A checkpoint ``<output-dir>/checkpoints/step-N`` holds

    model.safetensors             the model's weights (no DDP ``module.`` prefix: it resumes under any process count)
    optimizer.safetensors         the optimizer's moments and step counts; its param groups as JSON metadata
    training_state.json           the LR schedule, the step/token counters (`TrainState`), the fp16 loss scaler
    rng_state_<rank>.safetensors  per process: torch (CPU, CUDA) generator states; Python's and numpy's as JSON metadata
    manifest.json                 size and SHA-256 of every file above

Nothing in it is a pickle, so resuming never runs code from the folder (the manifest is a checksum, not a signature:
whoever can write the folder can rewrite it). A folder of an older version, written by accelerate's `save_state`
(``custom_checkpoint_0.pkl``, ``random_states_0.pkl``, ``optimizer.bin``), is refused and its pickles never loaded.

It is written as ``step-N.tmp`` and renamed once complete, so a kill mid-save leaves the previous checkpoint as the
latest; `verify_checkpoint` names the first missing or damaged file.
"""

import errno
import hashlib
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from training.safe_state import load_state, save_state

CHECKPOINT_PREFIX = "step-"
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "training_state.json"
FORMAT_VERSION = 2  # 1: accelerate save_state (pickles), never loaded
SAFE_SUFFIXES = (".safetensors", ".json")


def rng_file(rank: int) -> str:
    return f"rng_state_{rank}.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from or written (missing, damaged, unsafe, disk full); the message names
    the file."""


@dataclass
class TrainState:
    """Counters saved with every checkpoint (in training_state.json)."""

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


# ----------------------------------------------------------------------------------------------------------------
# RNG states as tensors + JSON
# ----------------------------------------------------------------------------------------------------------------


def rng_state(device_type: str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """This process's generator states: torch's as uint8 tensors, Python's and numpy's as JSON-ready lists."""
    tensors = {"torch": torch.get_rng_state()}
    if device_type == "cuda":
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors) - 1) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


# ----------------------------------------------------------------------------------------------------------------
# Checking a folder
# ----------------------------------------------------------------------------------------------------------------


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


def check_safe_format(folder: Path) -> None:
    """Refuse a folder holding anything but safetensors and JSON files (an older version's accelerate pickles, or
    files planted there), before any of it is read."""
    unsafe = sorted(p.name for p in folder.iterdir() if not (p.is_file() and p.name.endswith(SAFE_SUFFIXES)))
    if unsafe:
        raise CheckpointError(
            f"checkpoint {folder} holds {', '.join(unsafe)}: not safetensors or JSON (an older version of this script "
            "saved pickles with accelerate's save_state). Its pickles are never loaded, since unpickling runs code. "
            f"Keep its weights with a fresh run: --init-from {folder.parent.parent / 'final'} (a new optimizer and "
            f"schedule), or delete {folder}"
        )


def verify_checkpoint(folder: Path) -> None:
    """Raise CheckpointError naming the first unsafe, missing or damaged file of a checkpoint (checked against its
    manifest); reads no file but the manifest."""
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist")
    check_safe_format(folder)
    manifest = folder / MANIFEST
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"checkpoint manifest {manifest} is missing or unreadable ({err}); the checkpoint is incomplete"
        ) from None
    hint = f"delete {folder} to resume from the previous checkpoint, or start without --resume"
    for name in (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE):
        if name not in entries:
            raise CheckpointError(f"checkpoint file {folder / name} is not in {manifest}; {hint}")
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


# ----------------------------------------------------------------------------------------------------------------
# Writing and reading
# ----------------------------------------------------------------------------------------------------------------


class _WriteFailed(Exception):
    def __init__(self, path: Path, error: Exception):
        super().__init__(path, error)
        self.path, self.error = path, error

    def reason(self) -> str:
        full = getattr(self.error, "errno", None) == errno.ENOSPC or "No space left" in str(self.error)
        return "no space left on device" if full else f"{type(self.error).__name__}: {self.error}"


def _guarded(path: Path, write) -> None:
    """Run `write()`; an OSError or SafetensorError (safetensors' own I/O errors, a full disk among them) becomes a
    _WriteFailed naming `path`."""
    try:
        write()
    except (OSError, SafetensorError) as err:
        raise _WriteFailed(path, err) from err


def _is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _full_state(accelerator, model, optimizer) -> tuple[dict, dict]:
    """The model's and the optimizer's whole state dicts (FSDP gathers its shards, a collective), on the CPU."""
    if _is_fsdp(accelerator):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(
            model, optimizer.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return accelerator.unwrap_model(model).state_dict(), optimizer.state_dict()


def _write_checkpoint(accelerator, tmp: Path, model, optimizer, scheduler, state: TrainState) -> None:
    from safetensors.torch import save_file, save_model

    model_state, optimizer_state = _full_state(accelerator, model, optimizer)
    tensors, meta = rng_state(accelerator.device.type)
    rng_path = tmp / rng_file(accelerator.process_index)
    _guarded(rng_path, lambda: save_state(rng_path, {"rng": tensors}, meta={"rng": meta}))
    if not accelerator.is_main_process:
        return
    if _is_fsdp(accelerator):
        weights = {k: v.contiguous() for k, v in model_state.items()}
        _guarded(tmp / MODEL_FILE, lambda: save_file(weights, str(tmp / MODEL_FILE), metadata={"format": "pt"}))
    else:  # save_model stores tied weights once
        _guarded(tmp / MODEL_FILE, lambda: save_model(accelerator.unwrap_model(model), str(tmp / MODEL_FILE)))
    _guarded(tmp / OPTIMIZER_FILE,
             lambda: save_state(tmp / OPTIMIZER_FILE, {}, optimizers={"optimizer": optimizer_state}))
    scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
    training = {"format": FORMAT_VERSION, "train_state": state.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler}
    _guarded(tmp / STATE_FILE, lambda: (tmp / STATE_FILE).write_text(json.dumps(training, indent=1)))


def save_checkpoint(accelerator, root: Path, step: int, keep: int, model, optimizer, scheduler,
                    state: TrainState) -> Path:
    """Write step-N.tmp (see the module docstring), a checksum manifest, then rename it to step-N; prune to `keep`.
    A failed write (a full disk) removes step-N.tmp and raises CheckpointError naming the file; the earlier
    checkpoints stay as they were."""
    final, tmp = root / f"{CHECKPOINT_PREFIX}{step}", root / f"{CHECKPOINT_PREFIX}{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        _write_checkpoint(accelerator, tmp, model, optimizer, scheduler, state)
        accelerator.wait_for_everyone()  # every process's RNG file is in before the manifest lists them
        if accelerator.is_main_process:
            _guarded(tmp / MANIFEST, lambda: write_manifest(tmp))
    except _WriteFailed as failed:
        shutil.rmtree(tmp, ignore_errors=True)
        earlier = list_checkpoints(root)
        kept = (f"the earlier checkpoints are intact (latest: {earlier[-1]})" if earlier
                else "there is no earlier checkpoint")
        raise CheckpointError(f"could not write checkpoint file {failed.path}: {failed.reason()}; "
                              f"{tmp} was removed and {kept}; once it can be written (on a full disk: after freeing "
                              "space), continue with --resume") from None
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint file {path} is unreadable ({err})") from None


def _by_name(optimizer_state: dict, model, optimizer) -> dict:
    """An optimizer state saved without FSDP (`optimizer.state_dict()`: the parameters numbered in param-group order)
    keyed by parameter name instead, as FSDP's `set_optimizer_state_dict` takes it; one saved under FSDP as it is."""
    saved = [i for group in optimizer_state["param_groups"] for i in group["params"]]
    if all(isinstance(i, str) for i in saved):
        return optimizer_state
    sizes, expected = ([len(g["params"]) for g in groups]
                       for groups in (optimizer_state["param_groups"], optimizer.param_groups))
    if sizes != expected:
        raise ValueError(f"its parameter groups hold {sizes} parameters, this run's {expected}")
    names = {id(p): n for n, p in model.named_parameters()}
    current = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    name = dict(zip(saved, current))
    return {"state": {name[i]: s for i, s in optimizer_state["state"].items()},
            "param_groups": [{**group, "params": [name[i] for i in group["params"]]}
                             for group in optimizer_state["param_groups"]]}  # fmt: skip


def load_checkpoint(accelerator, folder: Path, model, optimizer, scheduler, state: TrainState) -> None:
    """Restore what `save_checkpoint` wrote into the prepared model and optimizer, the scheduler, `state` and this
    process's RNG states. Reads only safetensors and JSON (after `verify_checkpoint`); errors name the file."""
    from safetensors.torch import load_file, load_model

    check_safe_format(folder)
    training = _read_json(folder / STATE_FILE)
    if not isinstance(training, dict) or training.get("format") != FORMAT_VERSION:
        saved_format = training.get("format") if isinstance(training, dict) else None
        raise CheckpointError(f"checkpoint file {folder / STATE_FILE}: format {saved_format!r}, "
                              f"this version reads format {FORMAT_VERSION}")  # fmt: skip
    try:
        _, optimizers, _ = load_state(folder / OPTIMIZER_FILE)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    path = folder / MODEL_FILE
    try:
        if _is_fsdp(accelerator):
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(model, load_file(str(path)), options=options)
            path = folder / OPTIMIZER_FILE
            optimizer_state = _by_name(optimizers["optimizer"], model, optimizer)
            set_optimizer_state_dict(model, optimizer.optimizer, optimizer_state, options=options)
        else:
            load_model(accelerator.unwrap_model(model), str(path), device="cpu")
            path = folder / OPTIMIZER_FILE
            optimizer.load_state_dict(optimizers["optimizer"])
        path = folder / STATE_FILE
        scheduler.load_state_dict(training["scheduler"])
        state.load_state_dict(training["train_state"])
        if accelerator.scaler is not None and training.get("scaler"):
            accelerator.scaler.load_state_dict(training["scaler"])
    except (SafetensorError, RuntimeError, KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"checkpoint file {path} does not fit this run ({type(err).__name__}: {err}); give the "
                              "same model flags as the run that wrote it") from None
    rng_path = folder / rng_file(accelerator.process_index)
    if rng_path.is_file():  # absent when resuming under more processes than wrote it: this one keeps its seed
        try:
            tensors, _, meta = load_state(rng_path)
            set_rng_state(tensors["rng"], meta["rng"])
        except (ValueError, KeyError, TypeError, RuntimeError) as err:
            raise CheckpointError(f"checkpoint file {rng_path} is unreadable ({err})") from None


def save_final(accelerator, model, tokenizer, processor, out: Path) -> None:
    """`save_pretrained` of the model, tokenizer and processor into `out` (written aside, then swapped in)."""
    state_dict = accelerator.get_state_dict(model)  # collective under FSDP / DeepSpeed
    if accelerator.is_main_process:
        tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
        shutil.rmtree(tmp, ignore_errors=True)

        def write():
            accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict, save_function=accelerator.save)
            tokenizer.save_pretrained(tmp)
            processor.save_pretrained(tmp)

        try:
            _guarded(tmp, write)
        except _WriteFailed as failed:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"could not write the final model to {tmp}: {failed.reason()}; it was removed, {out} "
                                  "and the checkpoints are intact; once it can be written, "
                                  "continue with --resume") from None
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def resolve_resume(args, ckpt_root: Path) -> Path | None:
    existing = list_checkpoints(ckpt_root)
    if args.resume is None:
        if existing:
            raise CheckpointError(
                f"{args.output_dir} already holds checkpoints (latest {existing[-1]}); "
                "pass --resume to continue that run, or choose another --output-dir"
            )
        return None
    if args.resume == "auto":
        return existing[-1] if existing else None
    path = Path(args.resume)
    if not path.is_dir():
        raise CheckpointError(f"--resume {path}: no such checkpoint folder")
    return path
