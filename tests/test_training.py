"""The training script: a short run gives a loadable model, resuming continues the same loss curve, two processes
match one with the same global batch, a killed run loses no step, a damaged checkpoint is named in the error.

Single-process runs are called in-process (`training.train.main`), which saves the interpreter start; the
multi-process and kill tests need real subprocesses.
"""

import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TOKENIZER_TEXT, tiny_config
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from modeling_transfusion import (
    TransfusionDiffusionObjective,
    TransfusionForCausalLM,
    TransfusionProcessor,
    build_tokenizer,
)
from training import train as train_script
from training.arguments import build_parser
from training.collate import MicroBatchSampler, MixtureDataset, TransfusionCollator, parse_mix

KEYS = ("loss", "lm_loss", "diffusion_loss", "lr")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny tokenizer and a tiny random VAE (32×32 → 8×8×4, the tiny preset's latent grid) on disk."""
    root = tmp_path_factory.mktemp("train-assets")
    build_tokenizer(TOKENIZER_TEXT, vocab_size=300).save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[8, 8, 8], layers_per_block=1, latent_channels=4,
        norm_num_groups=4, sample_size=32,
    )  # fmt: skip
    vae.save_pretrained(root / "vae")
    return root


def flags(assets: Path, out: Path, *extra) -> list[str]:
    """tiny-debug recipe at micro-batch 2: 6 steps, a checkpoint every 3; extra flags override."""
    return [
        "--config", str(ROOT / "training/configs/tiny-debug.yaml"),
        "--tokenizer", str(assets / "tokenizer"), "--vae", str(assets / "vae"),
        "--latent-cache", str(assets / "latents"), "--output-dir", str(out),
        "--batch-size", "2", "--max-examples", "48", "--threads", "1", *extra,
    ]  # fmt: skip


def log_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """One uninterrupted process: 6 steps of 2 micro-batches of 2 (global batch 4)."""
    out = tmp_path_factory.mktemp("reference")
    train_script.main(flags(assets, out, "--grad-accum", "2"))
    return out


def test_short_run_writes_a_loadable_model_and_finite_losses(reference):
    log = log_of(reference)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    for r in log:
        assert math.isfinite(r["loss"]) and math.isfinite(r["lm_loss"]) and r["tokens_per_s"] > 0
        assert r["diffusion_loss"] is None or math.isfinite(r["diffusion_loss"])
    assert any(r["diffusion_loss"] is not None for r in log)
    assert sorted(p.name for p in (reference / "checkpoints").iterdir()) == ["step-3", "step-6"]
    assert (reference / "loss.png").stat().st_size > 0

    model = TransfusionForCausalLM.from_pretrained(reference / "final")
    processor = TransfusionProcessor.from_pretrained(reference / "final")
    saved = load_file(reference / "checkpoints/step-6/model.safetensors")  # the checkpoint holds the same weights
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0)
    batch = processor([["a photo of a dress"]], add_eos=True, return_labels=True)
    assert torch.isfinite(model(**batch).loss)


def test_init_from_starts_a_fresh_run_at_the_given_weights(assets, reference, tmp_path):
    out = tmp_path / "init"
    train_script.main(flags(assets, out, "--init-from", str(reference / "final"), "--max-steps", "1", "--lr", "0"))
    assert [r["step"] for r in log_of(out)] == [1]  # a new run: its own step count and schedule
    source = load_file(reference / "final" / "model.safetensors")
    started = load_file(out / "final" / "model.safetensors")  # lr 0: one step leaves the weights where they began
    for name, tensor in source.items():
        torch.testing.assert_close(started[name], tensor, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"--init-from .*do not fit the model these flags build .*size mismatch"):
        train_script.main(flags(assets, tmp_path / "wider", "--init-from", str(reference / "final"),
                                "--hidden-size", "64"))


def test_resume_continues_the_same_loss_curve_exactly(assets, reference, tmp_path):
    out = tmp_path / "resumed"
    train_script.main(flags(assets, out, "--grad-accum", "2", "--stop-at-step", "3"))
    assert [r["step"] for r in log_of(out)] == [1, 2, 3]
    train_script.main(flags(assets, out, "--grad-accum", "2", "--resume"))
    resumed, straight = log_of(out), log_of(reference)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(resumed[3:], straight[3:]):
        assert {k: a[k] for k in KEYS} == {k: b[k] for k in KEYS}, a["step"]


def test_resume_with_a_longer_schedule_uses_it_from_the_first_step(assets, reference, tmp_path):
    out = tmp_path / "longer"
    train_script.main(flags(assets, out, "--grad-accum", "2", "--stop-at-step", "3"))
    train_script.main(flags(assets, out, "--grad-accum", "2", "--resume", "--max-steps", "8"))
    log = log_of(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6, 7, 8]
    schedule = train_script.WarmupCosine(None, 8, 0.05)  # tiny-debug: peak lr 1e-3
    for r in log[3:]:  # logged before each step: the LR of the 8-step schedule, the first resumed step included
        assert r["lr"] == pytest.approx(1e-3 * schedule(r["step"] - 1), rel=1e-6), r["step"]


def test_time_budget_fits_the_schedule_and_stops_cleanly(assets, tmp_path):
    out = tmp_path / "timed"
    train_script.main(flags(assets, out, "--max-steps", "0", "--minutes", "0.05", "--calibrate-steps", "3",
                            "--save-every", "0"))
    log = log_of(out)
    assert len(log) > 4 and [r["step"] for r in log] == list(range(1, len(log) + 1))
    assert log[-1]["lr"] < 0.2 * max(r["lr"] for r in log)  # the fitted cosine has decayed
    assert (out / f"checkpoints/step-{len(log)}").is_dir() and (out / "final/model.safetensors").exists()


def test_existing_run_needs_resume_and_damaged_checkpoint_is_named(assets, reference, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(flags(assets, reference))  # checkpoints there, no --resume
    assert exit_info.value.code == 2 and "--resume" in capsys.readouterr().err

    import shutil

    out = tmp_path / "damaged"
    shutil.copytree(reference / "checkpoints", out / "checkpoints")
    weights = out / "checkpoints/step-6/model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 8] = b"\xff" * 8  # same size, different bytes
    weights.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(flags(assets, out, "--resume"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert str(weights) in err and "corrupted" in err and "Traceback" not in err

    (out / "checkpoints/step-6/manifest.json").unlink()
    with pytest.raises(SystemExit):
        train_script.main(flags(assets, out, "--resume"))
    assert "manifest.json" in capsys.readouterr().err


def test_killed_run_resumes_without_losing_a_step(assets, reference, tmp_path):
    """SIGKILL a run (checkpoint every step) once it has logged step 3; the resumed run redoes whatever the kill cut
    off and ends with the reference curve, every step logged once. If the kill lands after the end (a slow machine
    polls late) the resume is a no-op and the check still holds."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "training.train", *flags(assets, out, "--grad-accum", "2", "--save-every", "1")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        log = out / "log.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait(timeout=120)
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.read().decode()[-2000:]
    train_script.main(flags(assets, out, "--grad-accum", "2", "--resume"))
    resumed, straight = log_of(out), log_of(reference)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(resumed, straight):
        assert {k: a[k] for k in KEYS} == {k: b[k] for k in KEYS}, a["step"]
    assert not list((out / "checkpoints").glob("*.tmp"))


def _env() -> dict:
    return {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(assets, reference, tmp_path):
    """2 processes × micro-batch 2 × accumulation 1 == 1 process × micro-batch 2 × accumulation 2."""
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "training.train", *flags(assets, out, "--grad-accum", "1")]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["processes"] == 2
    multi, single = log_of(out), log_of(reference)
    assert [r["step"] for r in multi] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(multi, single):
        assert a["tokens"] == b["tokens"]
        for key in KEYS:
            assert (a[key] is None) == (b[key] is None)
            if a[key] is not None:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    ddp, one = load_file(out / "final/model.safetensors"), load_file(reference / "final/model.safetensors")
    for name in one:
        torch.testing.assert_close(ddp[name], one[name], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# The example stream and the collator
# ----------------------------------------------------------------------------------------------------------------


def _toy_dataset(seed=0, mix="fashion=0.4,shapes=0.4,text=0.2", image_first_prob=0.2):
    from training.collate import ImageSource

    images = {
        name: ImageSource(name, torch.randn(10, 4, 8, 8), [f"a photo of a {name} {i}" for i in range(10)])
        for name in ("fashion", "shapes")
    }
    texts = [" ".join(f"word{i}" for i in range(n)) for n in (5, 80, 200)]
    return MixtureDataset(images, texts, mix, image_first_prob=image_first_prob, seed=seed)


def test_stream_is_deterministic_and_follows_the_mixture():
    a, b, c = _toy_dataset(0), _toy_dataset(0), _toy_dataset(1)
    kinds = [a[i]["kind"] for i in range(4000)]
    assert kinds == [b[i]["kind"] for i in range(4000)] and kinds != [c[i]["kind"] for i in range(4000)]
    assert a[12345]["text"] == b[12345]["text"]  # random access, no replay
    share = {k: kinds.count(k) / len(kinds) for k in ("caption_image", "image_caption", "text")}
    assert share["text"] == pytest.approx(0.2, abs=0.03)
    assert share["image_caption"] / (1 - share["text"]) == pytest.approx(0.2, abs=0.03)
    text_only = _toy_dataset(0, "text=1")
    assert all(text_only[i]["kind"] == "text" for i in range(200))
    with pytest.raises(ValueError, match="unknown mixture source"):
        parse_mix("fashion=1,mnist=1")


def test_image_first_probability_per_source():
    from training.collate import parse_image_first

    same = _toy_dataset(0, image_first_prob="fashion=0.2,shapes=0.2")
    assert [same[i]["kind"] for i in range(500)] == [_toy_dataset(0)[i]["kind"] for i in range(500)]
    ds = _toy_dataset(0, image_first_prob={"fashion": 0.6, "shapes": 0.1})
    examples = [ds[i] for i in range(6000)]
    for source, expected in (("fashion", 0.6), ("shapes", 0.1)):
        kinds = [e["kind"] for e in examples if e["kind"] != "text" and source in e["text"]]
        assert kinds.count("image_caption") / len(kinds) == pytest.approx(expected, abs=0.03)
    assert parse_image_first("fashion=0.5") == {"fashion": 0.5, "shapes": 0.2}
    assert parse_image_first("0.3") == {"fashion": 0.3, "shapes": 0.3}
    with pytest.raises(ValueError, match="unknown image source"):
        parse_image_first("text=0.5")
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
        parse_image_first({"fashion": 1.5})
    for bad in ("fashion:0.5", "fashion=half"):
        with pytest.raises(ValueError, match="name=probability pairs"):
            parse_image_first(bad)
    with pytest.raises(ValueError, match="name=weight pairs"):
        parse_mix("fashion=lots")


def test_micro_batches_of_w_processes_times_a_equal_one_process_times_wa():
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    one = take(MicroBatchSampler(3, grad_accum=4), 8)  # two optimizer steps
    two = [take(MicroBatchSampler(3, grad_accum=2, num_processes=2, process_index=r), 4) for r in range(2)]
    # step s, accumulation a on process r is micro-batch (s·A + a)·W + r
    interleaved = [two[r][s * 2 + a] for s in range(2) for a in range(2) for r in range(2)]
    assert interleaved == one
    assert take(MicroBatchSampler(3, grad_accum=4, start_step=1), 4) == one[4:]


def test_collator_lays_out_rows_and_cuts_long_text(tokenizer):
    from conftest import tiny_config

    processor = TransfusionProcessor.from_model_config(tokenizer, tiny_config())
    ids = processor.special_ids
    ds = _toy_dataset(0)
    examples = [ds[i] for i in range(64)]
    text_rows = [e for e in examples if e["kind"] == "text"]
    image_rows = [e for e in examples if e["kind"] != "text"]
    batch = TransfusionCollator(processor, max_text_tokens=12)(examples)
    assert batch["example_index"].tolist() == list(range(64))
    text, images = batch["parts"]  # text rows first, each part padded to its own longest row
    assert "image_latents" not in text and len(text["input_ids"]) == len(text_rows)
    assert images["image_latents"].shape == (len(image_rows), 4, 8, 8)
    torch.testing.assert_close(images["image_latents"], torch.stack([e["latent"] for e in image_rows]))
    for part, rows in ((text, text_rows), (images, image_rows)):
        assert part["attention_mask"][:, -1].any()  # no all-padding column
        for row, ex, mask, labels in zip(part["input_ids"], rows, part["attention_mask"], part["labels"]):
            row = row[mask.bool()].tolist()
            assert row[0] == ids["bos"]
            assert (labels[~mask.bool()] == -100).all()
            if ex["kind"] == "text":
                assert len(row) <= 12 and ids["boi"] not in row
            else:
                assert row.count(ids["image"]) == 16 and row[-1] == ids["eos"]
                assert (row[1] == ids["boi"]) == (ex["kind"] == "image_caption")
    (single,) = TransfusionCollator(processor, max_text_tokens=12, split_text=False)(examples)["parts"]
    assert len(single["input_ids"]) == 64 and single["image_latents"].shape[0] == len(image_rows)


class _OneProcess:
    """What forward_backward uses of an Accelerator, for one CPU process."""

    device = torch.device("cpu")

    def no_sync(self, model):
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()


def test_forward_backward_of_split_parts_equals_one_part(processor):
    """Splitting a micro-batch into its text rows and its image rows changes the padding, not the loss: each part's
    LM loss is its sum over the micro-batch's count of targets, so the parts add up to the one-part micro-batch's
    losses and gradients, also when caption dropout (at 0.999: every caption→image row here) empties rows."""
    torch.manual_seed(0)
    model = TransfusionForCausalLM(tiny_config(caption_drop_prob=0.999)).train()
    objective = TransfusionDiffusionObjective(model.config)
    ds = _toy_dataset(0)
    examples = [ds[i] for i in range(16)]
    assert {e["kind"] for e in examples} == {"text", "caption_image", "image_caption"}

    def run(split):
        parts = TransfusionCollator(processor, max_text_tokens=12, split_text=split)(examples)["parts"]
        model.zero_grad()
        torch.manual_seed(3)  # the micro-batch seed: the same timesteps and noise for the same images
        stats = train_script.forward_backward(_OneProcess(), model, objective, parts)
        return len(parts), stats, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (n_one, one, grads_one), (n_two, two, grads_two) = run(False), run(True)
    assert (n_one, n_two) == (1, 2)
    assert one[0] > one[1] > 0 and one[2] > 0  # loss, LM loss, diffusion loss
    # different padding (another tensor layout, another float32 kernel path): a tolerance, not bit equality
    torch.testing.assert_close(two[:6], one[:6], rtol=1e-5, atol=1e-6)  # [6]: positions computed, padding included
    assert grads_one.keys() == grads_two.keys()
    for name in grads_one:
        torch.testing.assert_close(grads_two[name], grads_one[name], rtol=1e-4, atol=1e-6, msg=name)


def test_help_and_config_file_errors(tmp_path, capsys):
    assert "--resume" in build_parser().format_help()
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_size: 4\nnot_a_flag: 1\n")
    with pytest.raises(SystemExit):
        train_script.parse_args(["--config", str(bad)])
    assert "not_a_flag" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text("batch-size: 4\nlr: 0.01\n")
    args = train_script.parse_args(["--config", str(good), "--lr", "0.02"])
    assert (args.batch_size, args.lr) == (4, 0.02)
    assert args.image_first_prob == {"fashion": 0.2, "shapes": 0.2}
    for flag, value, message in (("--mix", "fashion=lots", "name=weight pairs"),
                                 ("--mix", "mnist=1", "unknown mixture"),
                                 ("--image-first-prob", "fashion=2", r"probabilities in \[0, 1\]")):
        with pytest.raises(SystemExit):
            train_script.parse_args([flag, value])
        assert re.search(message, capsys.readouterr().err), (flag, value)


def test_schedule_warms_up_then_decays_to_a_twentieth():
    s = train_script.WarmupCosine(warmup=10, horizon=110, final=0.05)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.525) and s(110) == pytest.approx(0.05) and s(500) == pytest.approx(0.05)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints hold no pickle; a full disk is named
# ----------------------------------------------------------------------------------------------------------------


class _TouchWhenUnpickled:
    """A pickle that runs code: unpickling it creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


def test_checkpoints_are_safetensors_and_json_only(reference):
    step = reference / "checkpoints/step-6"
    assert sorted(p.name for p in step.iterdir()) == [
        "manifest.json", "model.safetensors", "optimizer.safetensors", "rng_state_0.safetensors", "training_state.json",
    ]  # fmt: skip
    state = json.loads((step / "training_state.json").read_text())
    assert state["train_state"]["step"] == 6 and state["scheduler"]["last_epoch"] == 6


def test_resume_never_unpickles_what_the_checkpoint_folder_holds(assets, reference, tmp_path, capsys):
    """accelerate's custom-state and RNG pickles (the names it loads) planted or swapped in a checkpoint, with the
    manifest rewritten to match (a checksum, not a signature): --resume refuses the folder and runs none of them."""
    import pickle
    import shutil

    from training.checkpoints import write_manifest

    out = tmp_path / "planted"
    shutil.copytree(reference / "checkpoints", out / "checkpoints")
    step = out / "checkpoints/step-6"
    marker = tmp_path / "code-ran"
    payload = pickle.dumps(_TouchWhenUnpickled(marker))
    assert not marker.exists()
    for name in ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl"):
        (step / name).write_bytes(payload)
    write_manifest(step)
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(flags(assets, out, "--grad-accum", "2", "--resume", "--max-steps", "7"))
    err = capsys.readouterr().err
    assert not marker.exists(), "resuming ran code from the checkpoint folder"
    assert exit_info.value.code == 2 and str(step) in err and "never loaded" in err and "custom_checkpoint_0.pkl" in err
    assert "Traceback" not in err


def test_a_full_disk_names_the_file_and_keeps_the_earlier_checkpoint(assets, reference, tmp_path, capsys, monkeypatch):
    import errno

    import safetensors.torch

    from training.checkpoints import verify_checkpoint

    writes, real_save_file = [], safetensors.torch.save_file

    def fill_up_at_the_second_checkpoint(tensors, filename, metadata=None):
        writes.append(filename)
        if len(writes) > 1:
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", fill_up_at_the_second_checkpoint)  # what save_model calls
    out = tmp_path / "full"
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(flags(assets, out, "--grad-accum", "2"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert str(out / "checkpoints/step-6.tmp/model.safetensors") in err and "no space left on device" in err
    assert f"the earlier checkpoints are intact (latest: {out / 'checkpoints/step-3'})" in err
    assert not (out / "checkpoints/step-6.tmp").exists()
    verify_checkpoint(out / "checkpoints/step-3")

    monkeypatch.undo()  # space freed: the run continues from step 3 on the same curve
    train_script.main(flags(assets, out, "--grad-accum", "2", "--resume"))
    resumed, straight = log_of(out), log_of(reference)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(resumed, straight):
        assert {k: a[k] for k in KEYS} == {k: b[k] for k in KEYS}, a["step"]


def test_freeze_text_trains_the_image_experts_only_and_keeps_text_bitwise(assets, reference, tmp_path):
    """LMFusion: a dense text model becomes the text experts of a MoT model (image experts start as copies), and
    with --freeze-text training on mixed data leaves the text side bit for bit as it was."""
    from modeling_transfusion.experts_transfusion import image_expert_pairs, text_parameter_names

    out = tmp_path / "lmfusion"
    train_script.main(flags(assets, out, "--modality-experts", "mot", "--freeze-text", "--init-from",
                            str(reference / "final"), "--max-steps", "3", "--lr", "1e-2"))  # fmt: skip
    source = TransfusionForCausalLM.from_pretrained(reference / "final").eval()
    trained = TransfusionForCausalLM.from_pretrained(out / "final").eval()
    assert trained.config.modality_experts == "mot"
    before, after = source.state_dict(), trained.state_dict()
    text_names = text_parameter_names(trained)
    assert "model.embed_tokens.weight" in text_names and "model.layers.0.self_attn.q_proj.weight" in text_names
    for name in text_names:
        assert torch.equal(after[name], before[name]), name  # frozen: bitwise unchanged
    experts = image_expert_pairs(trained)
    moved = [name for name in experts if not torch.equal(after[name], before[experts[name]])]
    assert len(moved) == len(experts)  # every image expert started as its text weight and trained
    assert not torch.equal(after["model.patch_decoder.proj_out.weight"], before["model.patch_decoder.proj_out.weight"])
    ids = torch.tensor([[0, 40, 41, 42, 43]])
    assert torch.equal(trained(input_ids=ids).logits, source(input_ids=ids).logits)  # text-only: the same model

    with pytest.raises(SystemExit, match="--freeze-text: freezing the text side needs image experts"):
        train_script.main(flags(assets, tmp_path / "dense", "--freeze-text", "--max-steps", "1"))
