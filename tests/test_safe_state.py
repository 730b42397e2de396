"""No pickle is ever loaded: training state lives in safetensors + JSON, and the code holds no unsafe load."""

import ast
import json

import pytest
import torch
from conftest import ROOT

from training.safe_state import load_state, save_state


def test_optimizer_state_round_trips_and_training_continues_identically(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    x = torch.randn(8, 4)

    def step(m, opt):
        opt.zero_grad()
        m(x).pow(2).mean().backward()
        opt.step()

    step(model, optimizer)
    save_state(tmp_path / "state.safetensors", {"model": model.state_dict()}, {"opt": optimizer.state_dict()},
               {"step": 1})
    step(model, optimizer)

    restored = torch.nn.Linear(4, 3)
    restored_opt = torch.optim.AdamW(restored.parameters(), lr=1.0)
    modules, optimizers, meta = load_state(tmp_path / "state.safetensors")
    restored.load_state_dict(modules["model"])
    restored_opt.load_state_dict(optimizers["opt"])
    assert meta == {"step": 1} and restored_opt.param_groups[0]["lr"] == 1e-2
    step(restored, restored_opt)
    for a, b in zip(model.state_dict().values(), restored.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


def test_a_damaged_state_file_is_named(tmp_path):
    path = tmp_path / "state.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"state.safetensors is not a readable training state .*delete it"):
        load_state(path)


def test_vae_training_resumes_from_safe_state_and_never_reads_a_pickle(tmp_path, monkeypatch):
    from training import train_vae

    monkeypatch.setattr(train_vae, "reconstruction_mse", lambda vae, images: 0.0)  # the report is not under test
    flags = ["--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "vae"), "--batch-size", "4",
             "--n-shapes", "64", "--n-scale", "8", "--n-eval", "4", "--warmup-steps", "2",
             "--threads", "1"]  # fmt: skip
    train_vae.main([*flags, "--steps", "2"])
    assert (tmp_path / "run" / "state.safetensors").exists() and not (tmp_path / "run" / "state.pt").exists()
    report = train_vae.main([*flags, "--steps", "3", "--resume"])
    assert report["steps"] == 3
    _, _, meta = load_state(tmp_path / "run" / "state.safetensors")
    assert meta["step"] == 3 and json.loads(json.dumps(meta["args"]))["batch_size"] == 4

    # a run directory of an older version holds a pickle: it is refused, not loaded
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "state.pt").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(FileNotFoundError, match=r"state.pt of an older version is a pickle and is never loaded"):
        train_vae.main(["--run-dir", str(legacy), "--out", str(tmp_path / "v2"), "--steps", "1", "--resume"])


def _unsafe_loads(tree: ast.AST) -> list[int]:
    """Lines of calls that can unpickle: torch.load without weights_only=True, any call passing weights_only=False,
    pickle/dill/joblib loads, numpy loads with allow_pickle=True, and accelerate's state loaders
    (`accelerator.load_state`, which unpickles custom states with weights_only=False, and its functions imported by
    name)."""
    from_accelerate = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "accelerate"
        for alias in node.names
    }
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        keywords = {k.arg: k.value for k in node.keywords}
        flag = keywords.get("weights_only")
        if isinstance(flag, ast.Constant) and flag.value is False:
            lines.append(node.lineno)
            continue
        if isinstance(node.func, ast.Name):
            if node.func.id in from_accelerate and "load" in node.func.id:
                lines.append(node.lineno)
            continue
        if not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
        if node.func.attr == "load" and owner == "torch":
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                lines.append(node.lineno)
        elif node.func.attr in ("load", "loads", "Unpickler") and owner in ("pickle", "dill", "joblib", "cloudpickle"):
            lines.append(node.lineno)
        elif node.func.attr == "load" and owner in ("np", "numpy"):
            allow = keywords.get("allow_pickle")
            if isinstance(allow, ast.Constant) and allow.value is True:
                lines.append(node.lineno)
        elif node.func.attr in ("load_state", "load_custom_state", "load_accelerator_state") and owner != "safe_state":
            lines.append(node.lineno)
    return sorted(lines)


def test_no_code_in_the_repository_can_load_a_pickle():
    skip = {".venv", ".cache", ".git", "runs", "outputs", "data_cache", ".bench-venvs"}
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in skip or rel.parts[0] == "tests":
            continue  # tests load only tensors they wrote themselves, with torch's default weights_only=True
        found += [f"{rel}:{line}" for line in _unsafe_loads(ast.parse(path.read_text(), str(rel)))]
    assert not found, f"calls that can unpickle: {found}"
    # the scanner itself catches what it is for
    assert _unsafe_loads(ast.parse("torch.load(p)\ntorch.load(p, weights_only=False)\npickle.load(f)")) == [1, 2, 3]
    assert _unsafe_loads(ast.parse("torch.load(p, map_location='cpu', weights_only=True)")) == []
    accelerate_loads = (
        "accelerator.load_state(folder)\n"
        "self.accelerator.load_state(str(folder))\n"
        "from accelerate.checkpointing import load_custom_state\n"
        "load_custom_state(obj, folder)\n"
        "from accelerate.utils import load as acc_load\n"
        "acc_load(f, weights_only=True)\n"
        "anything(f, weights_only=False)\n"
        "load_file(f, weights_only=False)\n"
    )
    assert _unsafe_loads(ast.parse(accelerate_loads)) == [1, 2, 4, 6, 7, 8]
    # this repository's own safe reader is not one of them
    source = "from training.safe_state import load_state\nload_state(p)\nsafe_state.load_state(p)"
    assert _unsafe_loads(ast.parse(source)) == []
