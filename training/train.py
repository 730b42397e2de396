"""Train a Transfusion model with accelerate: next-token prediction on text and diffusion on VAE latents, one loss.

One CPU process, several processes (DDP) or sharded GPUs (FSDP / DeepSpeed via an accelerate config file) run the
same script; checkpoints resume exactly.

    python -m training.train --config training/configs/transfusion-tiny.yaml --minutes 40
    python -m training.train --config training/configs/transfusion-tiny.yaml --resume          # continue it
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 -m training.train --batch-size 32 ...
    accelerate launch --config_file training/configs/accelerate_fsdp.yaml -m training.train ...

Batches. ``--batch-size`` B is per process and micro-batch; the global batch is B × processes W × ``--grad-accum`` A.
Micro-batch m of the example stream (training/collate.py) holds examples m·B … m·B + B − 1, and before its forward
the global RNG is seeded from (seed, m), so the timesteps, noise and caption dropout that the diffusion objective
(`TransfusionDiffusionObjective`) draws belong to the micro-batch, not to the process. W processes × A and one
process × (W·A) therefore compute the same micro-batch losses and the same averaged gradient (up to float summation
order).

Resume. A checkpoint (``<output-dir>/checkpoints/step-N``: safetensors + JSON, never a pickle, and a checksum
manifest; see training/checkpoints.py) holds the model, optimizer, LR schedule, step counters and RNG states; since
the data position is a function of the step, the resumed run continues the same loss curve (bit for bit on CPU). A run
killed mid-way resumes from its last complete checkpoint and rewrites the log from there.
"""

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from training.checkpoints import (
    CHECKPOINT_PREFIX,
    CheckpointError,
    TrainState,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    save_final,
    verify_checkpoint,
)
from training.arguments import DEFAULT_STEPS, parse_args
from training.collate import LatentCacheError
from training.models import (
    build_config,
    build_model,
    load_base,
    load_initial_weights,
    load_tokenizer,
    vae_config_from,
)
from training.monitor import plot_losses, read_log, sample_prompts, write_samples

# ----------------------------------------------------------------------------------------------------------------
# LR schedule and micro-batch seeds
# ----------------------------------------------------------------------------------------------------------------


class WarmupCosine:
    """LR factor after `i` optimizer steps: linear warm-up, then cosine from 1 to `final` at `horizon`.

    A plain object (not a lambda) so `LambdaLR.state_dict` saves its fields and resuming restores them. With a time
    budget and no step count, `horizon` is None until calibrated; meanwhile the factor ramps over `provisional`."""

    def __init__(self, warmup: int | None, horizon: int | None, final: float, provisional: int = 1000):
        self.warmup, self.horizon, self.final, self.provisional = warmup, horizon, final, provisional
        if horizon is not None:
            self.set_horizon(horizon, warmup)

    def set_horizon(self, horizon: int, warmup: int | None = None) -> None:
        self.horizon = max(1, int(horizon))
        self.warmup = max(1, int(warmup if warmup is not None else round(0.02 * self.horizon)))

    def __call__(self, i: int) -> float:
        if self.horizon is None:
            return min(1.0, (i + 1) / self.provisional)
        if i < self.warmup:
            return (i + 1) / self.warmup
        progress = min(1.0, (i - self.warmup) / max(1, self.horizon - self.warmup))
        return self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def micro_seed(seed: int, micro_index: int) -> int:
    """The torch seed of micro-batch `micro_index`: the objective draws its timesteps, noise and dropout from it."""
    return int(np.random.SeedSequence([seed, 0x5EED, micro_index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def forward_backward(accelerator, model, objective, parts: list[dict]) -> torch.Tensor:
    """Forward and backward of one micro-batch, given as parts (its text, caption and interleaved rows: the collator).

    The loss is the micro-batch's L = L_LM + λ·L_diffusion with L_LM the mean over all its target tokens: every part
    gets `num_items_in_batch` = the micro-batch's count of targets (before caption dropout), so its LM loss is its
    sum over the micro-batch's count and the parts' LM losses add up to the micro-batch mean; the diffusion losses
    likewise (`num_images_in_batch`, the generated images of the micro-batch). Every part but the last
    runs without DDP gradient sync; the image part comes last, so the synchronising backward reaches every weight.
    Returns the log's sums: loss, LM loss, diffusion loss, 1 if it had images, 1, tokens, positions computed."""
    total = sum(int((part["labels"][:, 1:] != -100).sum()) for part in parts)
    images = sum(int((~part["image_is_input"]).sum()) for part in parts if "image_is_input" in part)
    stats = torch.zeros(7, dtype=torch.float64, device=accelerator.device)  # on the device: no sync per part
    stats[4] = 1.0
    for j, part in enumerate(parts):
        stats[5] += float(part["attention_mask"].sum())
        stats[6] += float(part["attention_mask"].numel())
        part = {k: v.to(accelerator.device, non_blocking=True) for k, v in part.items()}
        with accelerator.no_sync(model) if j < len(parts) - 1 else contextlib.nullcontext():
            out = objective(model, **part, num_items_in_batch=total or None,
                            num_images_in_batch=images or None)  # = L_LM share + λ·L_diffusion share
            loss = out.loss
            if not loss.requires_grad and j == len(parts) - 1:
                # text rows with the text side frozen (--freeze-text) have nothing to learn, but the synchronising
                # backward still runs, so every DDP process reduces the same gradients
                loss = loss + sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)
            if loss.requires_grad:
                accelerator.backward(loss)
        stats[0] += out.loss.detach().double()
        stats[1] += out.lm_loss.detach().double()
        if out.diffusion_loss is not None:
            stats[2] += out.diffusion_loss.detach().double()
            stats[3] = 1.0
    return stats


def train(args) -> dict:
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import DistributedType, GradientAccumulationPlugin, broadcast_object_list
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from modeling_transfusion import TransfusionDiffusionObjective, TransfusionProcessor
    from training.collate import (
        MicroBatchSampler,
        MixtureDataset,
        TransfusionCollator,
        check_row_lengths,
        load_or_encode_latents,
        parse_mix,
    )
    from training.datasets import DataError, build_sources, builtin_names, source_names

    t_start = time.time()
    torch.set_num_threads(args.threads)
    out_dir = Path(args.output_dir)
    ckpt_root, final_dir, log_path = out_dir / "checkpoints", out_dir / "final", out_dir / "log.jsonl"
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        cpu=args.cpu,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=args.grad_accum, sync_with_dataloader=False),
        # text-only micro-batches skip the image path
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    say = accelerator.print
    world, rank = accelerator.num_processes, accelerator.process_index
    # (on CPU processes accelerate turns a DeepSpeed launch into DDP: the launcher's variable says what was asked)
    if (accelerator.distributed_type == DistributedType.DEEPSPEED
            or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"):
        raise CheckpointError("DeepSpeed saves and resumes its state through pickles, and this script's checkpoints "
                              "are safetensors + JSON only; train sharded with FSDP "
                              "(training/configs/accelerate_fsdp.yaml) or DDP")
    _check_distributed(accelerator)
    resume_from = resolve_resume(args, ckpt_root)
    if resume_from is not None:
        verify_checkpoint(resume_from)

    if args.base:
        model, tokenizer = load_base(args.base)
        config = model.config
    else:
        tokenizer = load_tokenizer(args.tokenizer)
        config = build_config(args, tokenizer, vae_config_from(args.vae))
        model = build_model(config, args.vae, args.seed)
    if args.init_from and resume_from is None:  # a resumed checkpoint already holds its weights
        load_initial_weights(model, args.init_from)
        say(f"initialised the weights from {args.init_from}")
    if args.freeze_text:
        from modeling_transfusion.experts_transfusion import freeze_text

        try:
            frozen = freeze_text(model)
        except ValueError as err:
            raise SystemExit(f"--freeze-text: {err} (--modality-experts mot)") from None
        say(f"--freeze-text: {len(frozen)} text tensors frozen")
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if args.lora_rank:
        from training.lora import add_lora

        torch.manual_seed(args.seed)  # the adapter's initial weights follow the seed, as a fresh model's do
        model = add_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets,
                         args.lora_train_patch_modules)  # fmt: skip
        trainable, total = model.get_nb_trainable_parameters()
        say(f"LoRA r={args.lora_rank} on {args.lora_targets}: {trainable:,} trainable of {total:,} parameters")
    processor = TransfusionProcessor.from_model_config(tokenizer, config)
    objective = TransfusionDiffusionObjective(config)  # timesteps, noise, caption dropout; the model only predicts

    by_size = args.mix == "size"  # every example of the --dataset sources equally likely
    mix = (dict.fromkeys(source_names(args)[len(builtin_names()):], 1.0) if by_size
           else parse_mix(args.mix, source_names(args)))
    try:
        sources = build_sources(args, [k for k, w in mix.items() if w > 0], config.image_size, strict=not by_size)
    except ValueError as err:  # user data that cannot be read: the message names the file or row
        raise SystemExit(f"error: {err}") from None
    images, texts, interleaved = {}, {}, {}
    with accelerator.main_process_first():  # the main process encodes and caches; the others read the cache
        model.to(accelerator.device)
        for name, source in sources.items():
            if source.modality == "text":
                texts[name] = source.texts()[: args.max_examples]
                continue
            try:
                if source.modality == "interleaved":  # its images through the cache, then its rows with them
                    latents = load_or_encode_latents(model, source.images, None, args.latent_cache,
                                                     device=accelerator.device, log=say).latents  # fmt: skip
                    rows = source.rows(latents)[: args.max_examples]
                    interleaved[name] = check_row_lengths(processor, name, rows, config.max_position_embeddings)
                    continue
                images[name] = load_or_encode_latents(model, source, args.max_examples, args.latent_cache,
                                                      device=accelerator.device, log=say)  # fmt: skip
            except DataError as err:
                raise SystemExit(f"error: {err}") from None
    if by_size:
        mix = {name: float(len(rows)) for name, rows in {**images, **texts, **interleaved}.items()}
    first = {k: v for k, v in args.image_first_prob.items() if k in images}
    prompts = sample_prompts({name: source.captions for name, source in images.items()})
    dataset = MixtureDataset(images, texts, {k: w for k, w in mix.items() if w > 0}, first, args.seed, interleaved)
    # DeepSpeed counts backward calls as accumulation steps, and every FSDP forward is a collective that all ranks
    # must make as often: one forward per micro-batch there.
    split_text = accelerator.device.type == "cpu" if args.split_text is None else args.split_text
    split_text = split_text and accelerator.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    collator = TransfusionCollator(processor, args.max_text_tokens, split_text=split_text)

    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=tuple(args.betas), eps=args.eps,
    )  # fmt: skip
    horizon = args.max_steps or (None if args.minutes else DEFAULT_STEPS)  # None: fitted to the time budget
    schedule = WarmupCosine(args.warmup_steps, horizon, args.min_lr_ratio,
                            provisional=args.warmup_steps or 100 * args.calibrate_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    # no prepared DataLoader tells DeepSpeed the micro-batch
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.batch_size
    model, optimizer = accelerator.prepare(model, optimizer)
    if accelerator.is_fsdp2:  # a rank whose micro-batch has no image skips the image path: it reduces zeros for it
        model.set_reduce_scatter_unused_params(True)  # (FSDP2's find_unused_parameters)
    grad_accum = accelerator.gradient_accumulation_steps  # DeepSpeed's config may override the flag
    global_batch = args.batch_size * world * grad_accum
    state = TrainState(global_batch=global_batch, batch_size=args.batch_size, seed=args.seed)
    # The scheduler is not prepared: accelerate would step it once per process. Stepping it here once per optimizer
    # step keeps the schedule independent of the number of processes.
    saved_with = (model, optimizer, scheduler, state)  # what every checkpoint holds, with the RNG states

    if resume_from is not None:
        load_checkpoint(accelerator, resume_from, *saved_with)
        accelerator.step = 0  # micro-batch counter: every checkpoint sits on an optimizer-step boundary
        if (state.global_batch, state.batch_size, state.seed) != (global_batch, args.batch_size, args.seed):
            say(f"warning: {resume_from} was trained with global batch {state.global_batch} (micro-batch "
                f"{state.batch_size}, seed {state.seed}); now {global_batch} ({args.batch_size}, seed {args.seed}): "
                "the loss curve will not continue exactly")  # fmt: skip
            state.global_batch, state.batch_size, state.seed = global_batch, args.batch_size, args.seed
        if args.max_steps is not None and schedule.horizon != args.max_steps:
            say(f"note: the LR schedule now ends at step {args.max_steps} (was {schedule.horizon})")
            schedule.set_horizon(args.max_steps, args.warmup_steps)
        if schedule.horizon is None and args.minutes is None:  # saved before its time budget was calibrated
            schedule.set_horizon(DEFAULT_STEPS, args.warmup_steps)
            say(f"note: {resume_from} has no fitted schedule and no --minutes was given: "
                f"it now ends at step {DEFAULT_STEPS}")
        # The optimizer holds the LR the saved schedule set; the next step must already use the schedule as it is now.
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * schedule(scheduler.last_epoch)
        say(f"resumed {resume_from} at step {state.step}")
    elif args.resume == "auto":
        say(f"no checkpoint in {ckpt_root}; starting fresh")

    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_root.glob(f"{CHECKPOINT_PREFIX}*.tmp"):  # a save interrupted by a kill
            shutil.rmtree(stale, ignore_errors=True)
        kept = [r for r in read_log(log_path) if r["step"] <= state.step]  # steps after the checkpoint are redone
        log_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        named = [(n, p) for n, p in accelerator.unwrap_model(model).named_parameters() if ".vae." not in f".{n}"]
        n_params, n_trainable = sum(p.numel() for _, p in named), sum(p.numel() for _, p in named if p.requires_grad)
        run_info = {"args": vars(args), "processes": world, "global_batch": global_batch, "grad_accum": grad_accum,
                    "split_text": split_text, "transformer_parameters": n_params, "trainable_parameters": n_trainable,
                    "device": str(accelerator.device), "distributed_type": str(accelerator.distributed_type),
                    "config": config.to_dict()}  # fmt: skip
        (out_dir / "run.json").write_text(json.dumps(run_info, indent=1, default=str))
        say(f"{n_params / 1e6:.2f}M transformer parameters; {world} process(es) × batch {args.batch_size} × "
            f"accumulation {grad_accum} = global batch {global_batch}; "
            f"{args.threads} thread(s) per process")  # fmt: skip

    sampler = MicroBatchSampler(args.batch_size, grad_accum, world, rank, start_step=state.step)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collator, num_workers=args.workers)
    batches = iter(loader)

    stop = {"signal": None}
    previous_handlers = {}

    def on_signal(signum, frame):
        stop["signal"] = signal.Signals(signum).name

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous_handlers[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not the main thread
            pass

    budget_s = None if args.minutes is None else args.minutes * 60
    session_steps, session_tokens, session_time, t_first = 0, 0, 0.0, None
    bar = tqdm(total=schedule.horizon, initial=state.step, desc="train", dynamic_ncols=True,
               disable=not accelerator.is_local_main_process)
    last_saved, notes, fit = -1, [], None  # fit: the last fit of the schedule to the time budget (this session)
    model.train()
    try:
        while True:
            if schedule.horizon is not None and state.step >= schedule.horizon:
                break
            if args.stop_at_step is not None and state.step >= args.stop_at_step:
                break
            t0 = time.perf_counter()
            sums = torch.zeros(7, dtype=torch.float64, device=accelerator.device)  # see forward_backward
            grad_norm = None
            lr = optimizer.param_groups[0]["lr"]
            for _ in range(grad_accum):
                batch = next(batches)
                micro = int(batch["example_index"][0]) // args.batch_size
                torch.manual_seed(micro_seed(args.seed, micro))
                with accelerator.accumulate(model):
                    sums += forward_backward(accelerator, model, objective, batch["parts"])
                    if accelerator.sync_gradients:
                        if args.clip > 0:
                            grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.clip)
                        optimizer.step()
                        if not accelerator.optimizer_step_was_skipped:
                            scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                raise RuntimeError("gradient accumulation fell out of step with the optimizer steps")
            totals = accelerator.reduce(sums, "sum").cpu()  # the step's one host sync
            step_s = time.perf_counter() - t0
            state.step += 1
            state.tokens += int(totals[5])
            state.examples += global_batch
            state.train_seconds += step_s
            session_steps += 1
            if session_steps == 1:
                t_first = time.time()
            else:
                session_tokens += int(totals[5])
                session_time += step_s
            if state.step % args.log_every == 0 and accelerator.is_main_process:
                record = {
                    "step": state.step,
                    "loss": float(totals[0] / totals[4]),
                    "lm_loss": float(totals[1] / totals[4]),
                    "diffusion_loss": float(totals[2] / totals[3]) if totals[3] else None,
                    "lr": lr,
                    "grad_norm": None if grad_norm is None else float(grad_norm),
                    "tokens": int(totals[5]),
                    "tokens_per_s": float(totals[5] / step_s),
                    "fill": float(totals[5] / totals[6]),  # non-padding share of the positions computed
                    "step_s": step_s,
                    "elapsed_s": state.train_seconds,
                }
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{record['loss']:.3f}", lm=f"{record['lm_loss']:.3f}",
                                tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            bar.update(1)

            fit_now = schedule.horizon is None and session_steps == args.calibrate_steps + 1
            if fit is not None and state.step == fit["next"] and fit["left"] > 0:
                fit_now = True  # re-fit halfway through what is left: step times drift on a shared machine
            if fit_now:
                # Fit the schedule to the time budget from the step time measured since the last fit (first step
                # of the session excluded); keep 5% spare for saving and jitter.
                t_since, steps_since = ((t_first, args.calibrate_steps) if fit is None
                                        else (fit["time"], state.step - fit["step"]))
                per_step = (time.time() - t_since) / max(1, steps_since)
                remaining = budget_s - (time.time() - t_start)
                horizon = [state.step + max(1, int(0.95 * remaining / per_step))]
                broadcast_object_list(horizon)
                schedule.set_horizon(horizon[0], args.warmup_steps if fit is None else schedule.warmup)
                bar.total = schedule.horizon
                fit = {"time": time.time(), "step": state.step, "next": (state.step + schedule.horizon) // 2,
                       "left": 3 if fit is None else fit["left"] - 1}  # fmt: skip
                say(f"\n{per_step:.3f} s/step → LR schedule of {schedule.horizon} steps for {args.minutes} min")

            out_of_time = budget_s is not None and time.time() - t_start > budget_s
            if args.stop_at_step is not None and state.step >= args.stop_at_step:
                stop["signal"] = stop["signal"] or f"--stop-at-step {args.stop_at_step}"
            if out_of_time or stop["signal"]:
                accelerator.set_trigger()
            stopping = accelerator.check_trigger()
            finished = stopping or (schedule.horizon is not None and state.step >= schedule.horizon)
            if (args.save_every and state.step % args.save_every == 0) or finished:
                save_checkpoint(accelerator, ckpt_root, state.step, args.keep_checkpoints, *saved_with)
                save_final(accelerator, model, tokenizer, processor, final_dir)
                last_saved = state.step
            if args.sample_every and (state.step % args.sample_every == 0 or finished) and accelerator.is_main_process:
                plot_losses(log_path, out_dir / "loss.png")
                if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
                    notes.append("sample grids are skipped under FSDP / DeepSpeed (sharded weights)")
                else:
                    (out_dir / "samples").mkdir(exist_ok=True)
                    unwrapped = accelerator.unwrap_model(model)
                    unwrapped = unwrapped.get_base_model() if args.lora_rank else unwrapped  # its LoRA layers active
                    note = write_samples(unwrapped, tokenizer, out_dir / "samples" / f"step-{state.step}.png",
                                         args.seed, prompts)  # fmt: skip
                    if note not in notes:
                        notes.append(note)
            if stopping:
                why = stop["signal"] or f"time budget of {args.minutes} min spent"
                say(f"\nstopping at step {state.step}: {why}")
                break
    finally:
        bar.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)

    if session_steps and last_saved != state.step:
        save_checkpoint(accelerator, ckpt_root, state.step, args.keep_checkpoints, *saved_with)
        save_final(accelerator, model, tokenizer, processor, final_dir)
    if accelerator.is_main_process:
        plot_losses(log_path, out_dir / "loss.png")
    tokens_per_s = session_tokens / session_time if session_time else float("nan")
    if session_steps:
        say(f"\ntrained to step {state.step} ({state.tokens:,} tokens, {state.train_seconds / 60:.1f} min of steps); "
            f"{tokens_per_s:,.0f} tokens/s this session")  # fmt: skip
    else:
        say(f"nothing to train: the run is at step {state.step}, where its schedule (or --stop-at-step) ends")
    for note in notes:
        say(note)
    say(f"wrote: model, tokenizer, processor → {final_dir}\n       checkpoints → {ckpt_root}\n       "
        f"log → {log_path}\n       loss plot → {out_dir / 'loss.png'}")  # fmt: skip
    summary = {"step": state.step, "tokens_per_s": tokens_per_s, "output_dir": str(out_dir), "processes": world}
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _check_distributed(accelerator) -> None:
    """Refuse a launch that accelerate did not set up as launched, and run an FSDP launch on CPU processes sharded.

    accelerate 1.15 enters FSDP only from a GPU-like distributed type (`AcceleratorState.__init__`): on CPU processes
    (ACCELERATE_USE_CPU=true or --cpu) an FSDP config silently becomes DDP over gloo. Here it gets the switch accelerate
    makes on GPUs: the FSDP plugin from the launcher's FSDP_* variables, FSDP as the distributed type of both states;
    `prepare` then shards the model with accelerate's own FSDP2 path (`fully_shard`), its collectives over gloo."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:  # else every process would train alone, into the same output folder
        raise SystemExit(f"this process is one of {launched} launched (WORLD_SIZE), but accelerate set up "
                         f"{accelerator.num_processes}: without a GPU, set ACCELERATE_USE_CPU=true or pass --cpu "
                         "(an accelerate config's use_cpu does not reach the processes of a multi-process "
                         "launch)")  # fmt: skip
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp and accelerator.distributed_type == DistributedType.MULTI_CPU:
        if accelerator.mixed_precision == "fp16":
            raise SystemExit("FSDP on CPU processes: --mixed-precision fp16 is not supported (use no or bf16)")
        plugin = FullyShardedDataParallelPlugin()
        if accelerator.mixed_precision != "no":
            plugin.set_mixed_precision(accelerator.mixed_precision)
        accelerator.state.fsdp_plugin = plugin
        accelerator.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def _reset_accelerate() -> None:
    """Let a later in-process run (tests) build a fresh Accelerator, also after an error."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        return train(args)
    except (CheckpointError, FileNotFoundError, LatentCacheError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        _reset_accelerate()


if __name__ == "__main__":
    main()
