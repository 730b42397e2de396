"""Sharded training on CPU processes: `accelerate launch` with training/configs/accelerate_fsdp_cpu.yaml (FSDP2, 2
processes, gloo) trains like one process with the same global batch, resumes exactly, and saves the same model; the
GPU FSDP and DeepSpeed configs parse through accelerate's launcher; training.train refuses DeepSpeed and a launch that
accelerate did not set up.

Tolerances. A 2-process run sums each gradient in another order than one process accumulating two micro-batches
(a reduce-scatter of the two halves), so its losses and weights differ from the 1-process run by float rounding:
measured here up to 3.6e-7 in a loss and 7.5e-9 (1.2e-7 for weights near 1) in a weight after 6 steps. The test
takes the DDP test's tolerance (rel 1e-5, abs 1e-6), above that rounding yet far below what a wrong shard or a
missed reduction changes (one step at lr 1e-3 moves a weight by up to ~1e-3). The FSDP run resumed from its own
checkpoint runs the same processes, shards and reductions on weights restored bit for bit, so it is compared exactly.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file
import test_training
from test_training import KEYS, _env, _free_port, flags, log_of

from training import train as train_script

CPU_CONFIG = ROOT / "training/configs/accelerate_fsdp_cpu.yaml"
GPU_CONFIG = ROOT / "training/configs/accelerate_fsdp.yaml"
DEEPSPEED_CONFIG = ROOT / "training/configs/accelerate_deepspeed.yaml"
RTOL, ATOL = 1e-5, 1e-6
assets, reference = test_training.assets, test_training.reference  # its fixtures (built again for this module)


def launch_fsdp(assets: Path, out: Path, *extra) -> subprocess.CompletedProcess:
    """`accelerate launch` of training.train with the CPU FSDP config: 2 processes × micro-batch 2 × accumulation 1."""
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(CPU_CONFIG), "--main_process_port", str(_free_port()),
           "-m", "training.train", *flags(assets, out, "--grad-accum", "1", *extra)]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_same_losses(a: list[dict], b: list[dict], exact: bool) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"], x["step"]
        for key in KEYS:
            if exact or x[key] is None or y[key] is None:
                assert x[key] == y[key], (x["step"], key)
            else:
                assert x[key] == pytest.approx(y[key], rel=RTOL, abs=ATOL), (x["step"], key)


def assert_same_weights(a: Path, b: Path, exact: bool) -> None:
    x, y = load_file(a), load_file(b)
    assert sorted(x) == sorted(y)
    for name in y:
        assert x[name].dtype == y[name].dtype and x[name].shape == y[name].shape, name
        torch.testing.assert_close(x[name], y[name], rtol=0 if exact else RTOL, atol=0 if exact else ATOL, msg=name)


@pytest.fixture(scope="module")
def fsdp(assets, tmp_path_factory):
    """6 uninterrupted FSDP steps on 2 CPU processes (global batch 4, as `reference`)."""
    out = tmp_path_factory.mktemp("fsdp")
    launch_fsdp(assets, out)
    return out


@pytest.mark.slow
def test_fsdp_on_two_processes_matches_one_process_with_the_same_global_batch(fsdp, reference):
    run = json.loads((fsdp / "run.json").read_text())
    assert (run["processes"], run["distributed_type"], run["global_batch"]) == (2, "DistributedType.FSDP", 4)
    assert run["split_text"] is False  # one forward per micro-batch: every FSDP forward is a collective
    assert_same_losses(log_of(fsdp), log_of(reference), exact=False)
    # the gathered checkpoint and the final save_pretrained export both equal the 1-process saves
    assert_same_weights(fsdp / "checkpoints/step-6/model.safetensors",
                        reference / "checkpoints/step-6/model.safetensors", exact=False)
    assert_same_weights(fsdp / "final/model.safetensors", reference / "final/model.safetensors", exact=False)
    assert {p.name for p in (fsdp / "checkpoints/step-6").iterdir()} == {
        "model.safetensors", "optimizer.safetensors", "training_state.json", "manifest.json",
        "rng_state_0.safetensors", "rng_state_1.safetensors",
    }  # fmt: skip  (no pickles, no accelerate sharded state)


@pytest.mark.slow
def test_fsdp_resumed_from_its_checkpoint_continues_exactly(assets, fsdp, tmp_path):
    out = tmp_path / "resumed"
    launch_fsdp(assets, out, "--stop-at-step", "3")
    assert [r["step"] for r in log_of(out)] == [1, 2, 3]
    result = launch_fsdp(assets, out, "--resume")
    assert f"resumed {out / 'checkpoints/step-3'} at step 3" in result.stdout + result.stderr
    assert_same_losses(log_of(out), log_of(fsdp), exact=True)
    assert_same_weights(out / "final/model.safetensors", fsdp / "final/model.safetensors", exact=True)


@pytest.mark.slow
def test_fsdp_resumes_a_one_process_checkpoint(assets, fsdp, reference, tmp_path):
    """A checkpoint written without FSDP (optimizer state numbered, not named) continues under FSDP on the same
    curve."""
    out = tmp_path / "from-one"
    shutil.copytree(reference / "checkpoints/step-3", out / "checkpoints/step-3")
    launch_fsdp(assets, out, "--resume")
    assert_same_losses(log_of(out), log_of(fsdp)[3:], exact=False)
    assert_same_weights(out / "final/model.safetensors", reference / "final/model.safetensors", exact=False)


# ----------------------------------------------------------------------------------------------------------------
# The config files through accelerate's launcher (no launch), and what training.train refuses
# ----------------------------------------------------------------------------------------------------------------


def _launch_env(config: Path) -> tuple[object, dict]:
    """The parsed `accelerate launch --config_file config -m training.train` arguments and the environment its
    processes would get (DeepSpeed's launcher when the config says DeepSpeed, else torchrun's)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        ["--config_file", str(config), "--main_process_port", str(_free_port()), "-m", "training.train"]
    )
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command sets it up before deepspeed_launcher
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        cmd, env = prepare_deepspeed_cmd_env(args)
        assert cmd is None  # one machine: torchrun starts the processes, no `deepspeed` command
        return args, env
    return args, prepare_multi_gpu_env(args)


def test_fsdp_configs_parse_through_accelerate_and_shard_alike():
    from accelerate.utils import FullyShardedDataParallelPlugin

    launches = {}
    for config in (GPU_CONFIG, CPU_CONFIG):
        args, env = _launch_env(config)
        assert args.use_fsdp and env["ACCELERATE_USE_FSDP"] == "true"
        with mock.patch.dict(os.environ, env, clear=True):
            plugin = FullyShardedDataParallelPlugin()  # what each process builds from the launcher's FSDP_* variables
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
        assert plugin.transformer_cls_names_to_wrap == ["TransfusionDecoderLayer"]
        assert not plugin.activation_checkpointing
        launches[config] = (args.nproc_per_node, env["ACCELERATE_MIXED_PRECISION"], args.use_cpu)
    assert launches[GPU_CONFIG] == ("8", "bf16", False)
    assert launches[CPU_CONFIG] == ("2", "no", True)
    gpu, cpu = (load_config(c)["fsdp_config"] for c in (GPU_CONFIG, CPU_CONFIG))
    assert cpu == gpu  # the CPU test proves the GPU file's sharding settings


def load_config(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_deepspeed_config_parses_through_accelerate():
    """DeepSpeed is not installed here (and training.train refuses it): the config is checked as far as accelerate
    goes without it, to the DeepSpeed config its processes would build."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    cluster = load_config_from_file(str(DEEPSPEED_CONFIG))  # accelerate's ClusterConfig: unknown keys are refused
    assert cluster.distributed_type == DistributedType.DEEPSPEED and cluster.num_processes == 8
    args, env = _launch_env(DEEPSPEED_CONFIG)
    assert args.use_deepspeed and env["ACCELERATE_USE_DEEPSPEED"] == "true"
    with mock.patch.dict(os.environ, env, clear=True):
        plugin = DeepSpeedPlugin()
        plugin.set_mixed_precision(env["ACCELERATE_MIXED_PRECISION"])
    ds = plugin.deepspeed_config
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 1.0
    zero = ds["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "none"
    assert ds["bf16"] == {"enabled": True} and ds["gradient_accumulation_steps"] == "auto"  # the script sets it


def test_training_refuses_deepspeed_with_its_reason(assets, tmp_path, monkeypatch, capsys):
    """accelerate will not set DeepSpeed up without the package, so an Accelerator that reports DeepSpeed stands in."""
    import accelerate
    from accelerate.utils import DistributedType

    class DeepSpeedAccelerator(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.reports_deepspeed = True

        @property
        def distributed_type(self):
            return (DistributedType.DEEPSPEED if getattr(self, "reports_deepspeed", False)
                    else self.state.distributed_type)

    monkeypatch.setattr(accelerate, "Accelerator", DeepSpeedAccelerator)
    out = tmp_path / "deepspeed"
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(flags(assets, out))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "DeepSpeed saves and resumes its state through pickles" in err and "accelerate_fsdp.yaml" in err
    assert not out.exists()


def test_a_launch_accelerate_did_not_set_up_is_refused(assets, tmp_path, monkeypatch):
    """`accelerate launch` of a use_cpu config without ACCELERATE_USE_CPU on a machine without a GPU: every process
    would train alone into the same folder."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    with pytest.raises(SystemExit,
                       match=r"one of 2 launched .*accelerate set up 1: .*ACCELERATE_USE_CPU=true or pass --cpu"):
        train_script.main(flags(assets, tmp_path / "alone"))
    assert not (tmp_path / "alone").exists()
