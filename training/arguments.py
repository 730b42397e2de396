"""The command line of `training.train`: its flags (a `--config` YAML/JSON file supplies the same keys), their
checks and ranges, and the model flags' mapping onto `TransfusionConfig` fields."""

import argparse
import json
import math
import os
from pathlib import Path

from training.datasets import DEFAULT_MIX, add_dataset_arguments
from training.lora import DEFAULT_TARGETS, PATCH_MODULES

DEFAULT_STEPS = 2000
# command-line flag → TransfusionConfig field
MODEL_FLAGS = {
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "layers": "num_hidden_layers",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "patch_size": "patch_size",
    "patch_encoder": "patch_encoder",
    "unet_channels": "unet_block_out_channels",
    "diffusion_type": "diffusion_type",
    "prediction_type": "prediction_type",
    "diffusion_loss_weight": "diffusion_loss_weight",
    "caption_drop": "caption_drop_prob",
    "max_position_embeddings": "max_position_embeddings",
    "modality_experts": "modality_experts",
}


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="YAML/JSON file whose keys are these flags (batch_size or batch-size); "
                   "flags given here override it")
    g = p.add_argument_group("inputs and outputs")
    g.add_argument("--tokenizer", default="checkpoints/tokenizer",
                   help="tokenizer folder (python -m training.train_tokenizer)")
    g.add_argument("--vae", default="checkpoints/vae", help="AutoencoderKL folder (python -m training.train_vae)")
    g.add_argument("--output-dir", default="runs/transfusion", help="log, plots, checkpoints/ and final/ go here")
    g.add_argument("--latent-cache", default="runs/latent-cache", help="folder for the VAE latents of the image sets")
    g = p.add_argument_group("model (unset fields come from --preset; latent size/channels from the VAE)")
    g.add_argument("--preset", default="tiny", help="TransfusionConfig preset: tiny, paper-0.16B … paper-7B")
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--intermediate-size", type=int,
                   help="MLP width (default with --hidden-size: 8/3·d rounded up to 256)")
    g.add_argument("--layers", type=int)
    g.add_argument("--heads", type=int)
    g.add_argument("--kv-heads", type=int)
    g.add_argument("--patch-size", type=int)
    g.add_argument("--patch-encoder", choices=("linear", "unet"))
    g.add_argument("--unet-channels", type=int, nargs="+", help="U-Net patch encoder channels, one per resolution")
    g.add_argument("--diffusion-type", choices=("ddpm", "flow_matching"))
    g.add_argument("--prediction-type", choices=("epsilon", "v_prediction", "sample", "flow"))
    g.add_argument("--diffusion-loss-weight", type=float, help="λ in L = L_LM + λ·L_diffusion (paper: 5)")
    g.add_argument("--noise-limit", type=int,
                   help="an image before its caption gets t < N (paper: 500; the bundled model ends with 100; "
                   "0 disables)")
    g.add_argument("--caption-drop", type=float, help="caption dropout probability for classifier-free guidance")
    g.add_argument("--max-position-embeddings", type=int)
    g.add_argument("--modality-experts", choices=("shared", "mot"),
                   help="mot: image copies of attention, MLP and norms for the image slots (Mixture-of-Transformers)")
    g.add_argument("--freeze-text", action="store_true",
                   help="(mot) no updates to the text experts, token embedding and LM head: train the image side only, "
                   "as LMFusion does on a pretrained language model (--init-from it)")
    g.add_argument("--model-kwargs", type=json_object,
                   help='more TransfusionConfig fields as JSON, e.g. \'{"rms_norm_eps": 1e-5}\'')
    g.add_argument("--attn-implementation", choices=("sdpa", "eager"), default="sdpa")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g = p.add_argument_group("data")
    g.add_argument("--mix", default=",".join(f"{name}={weight}" for name, weight in DEFAULT_MIX.items()),
                   help="mixture weights by dataset name: the built-in fashion, shapes, text and any --dataset NAME; "
                   "'size': the --dataset sources, every example equally likely")
    g.add_argument("--image-first-prob", default=0.2,
                   help="share of image→caption rows (paper: 0.2): one number, or per source, "
                   "e.g. fashion=0.4,shapes=0.3")
    g.add_argument("--max-text-tokens", type=int, default=64, help="text rows are cut to a window of this many tokens")
    g.add_argument("--max-examples", type=int, help="use only the first N items of every source (tests, debugging)")
    g.add_argument("--split-text", action=argparse.BooleanOptionalAction, default=None,
                   help="run a micro-batch's text rows and image rows as two padded batches: less padding, twice the "
                   "launches (default: on CPU, where it is 1.6-1.75x faster; off on GPU, where small models are "
                   "launch-bound)")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--base", help="fine-tune a saved model or pipeline folder: its config, weights and tokenizer (the "
                   "model flags, --tokenizer and --vae are then unused; for a new run from weights whose architecture "
                   "these flags give, use --init-from)")  # fmt: skip
    g.add_argument("--lora-rank", type=int, default=0, help="train a LoRA adapter of this rank instead of every weight "
                   "(0: full training); final/ then holds the adapter")  # fmt: skip
    g.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha; the update is scaled by alpha/rank")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")
    g.add_argument("--lora-targets", default=",".join(DEFAULT_TARGETS), help="comma-separated layer names to adapt")
    g.add_argument("--lora-train-patch-modules", action="store_true",
                   help=f"with LoRA, also train {', '.join(PATCH_MODULES)} in full (PEFT modules_to_save)")
    add_dataset_arguments(p)
    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=int,
                   help="optimizer steps; the LR schedule spans them "
                   f"(a fresh run without --minutes: {DEFAULT_STEPS}; 0: none)")
    g.add_argument("--minutes", type=float,
                   help="wall-clock budget of this invocation: stop cleanly and save when spent; "
                   "without --max-steps the schedule is fitted to the budget after --calibrate-steps steps")
    g.add_argument("--calibrate-steps", type=int, default=10)
    g.add_argument("--stop-at-step", type=int,
                   help="save and stop at this step as an interruption would; the LR schedule "
                   "still spans --max-steps, and --resume continues it")
    g.add_argument("--batch-size", type=int, default=16, help="examples per process and micro-batch")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step and process")
    g.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (paper: 3e-4)")
    g.add_argument("--min-lr-ratio", type=float, default=0.05, help="cosine floor as a fraction of --lr (paper: 1/20)")
    g.add_argument("--warmup-steps", type=int,
                   help="linear warm-up (default: 2%% of the schedule, the paper's 4k of 250k)")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95))
    g.add_argument("--eps", type=float, default=1e-8)
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    g.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"),
                   help="default: accelerate's config / env, else no")
    g = p.add_argument_group("checkpoints, logging")
    g.add_argument("--save-every", type=int, default=500,
                   help="checkpoint (and final/) every N steps; 0: only at the end")
    g.add_argument("--keep-checkpoints", type=int, default=2)
    g.add_argument("--resume", nargs="?", const="auto",
                   help="continue the latest checkpoint of --output-dir, or the given one")
    g.add_argument("--init-from",
                   help="start a fresh run (new optimizer and schedule) from the weights of a model or pipeline "
                   "folder, e.g. checkpoints/transfusion-tiny; the model flags must describe the same architecture")
    g.add_argument("--sample-every", type=int, default=500,
                   help="loss plot and sample grid every N steps (0: plot at the end only)")
    g.add_argument("--log-every", type=int, default=1, help="log.jsonl record every N steps")
    g = p.add_argument_group("runtime")
    g.add_argument("--threads", type=int, default=int(os.environ.get("TRANSFUSION_THREADS", "1")),
                   help="torch CPU threads per process")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is present")
    return p


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not JSON ({err}); expected an object such as '{{\"rms_norm_eps\": 1e-5}}'"
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a JSON object such as '{{\"rms_norm_eps\": 1e-5}}'")
    return value


def load_config_file(path: str) -> dict:
    text = Path(path).read_text()
    if path.endswith(".json"):
        try:
            values = json.loads(text)
        except ValueError as err:
            raise ValueError(f"not valid JSON ({err})") from None
    else:
        import yaml

        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(values, dict):
        raise ValueError(f"expected a mapping of flag names to values, got {type(values).__name__}")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def _config_value(action: argparse.Action, value):
    """A config file's value for `action`'s flag, checked as the command line would check it (argparse applies no
    `type` or `choices` to defaults); raises ValueError saying what the flag takes."""
    if value is None:
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise ValueError(f"{value!r} is not true or false")
        return value
    if action.type is json_object:
        if not isinstance(value, dict):
            raise ValueError(f"{value!r} is not a mapping of TransfusionConfig fields to values")
        return value

    def one(v):
        if action.type is int:
            if isinstance(v, bool) or not (
                isinstance(v, int) or (isinstance(v, str) and v.strip().lstrip("-").isdigit())
            ):
                raise ValueError(f"{value!r} is not an integer")
            v = int(v)
        elif action.type is float:
            try:
                if isinstance(v, bool) or not isinstance(v, (int, float, str)):
                    raise ValueError
                v = float(v)
            except ValueError:
                raise ValueError(f"{value!r} is not a number") from None
        if action.choices is not None and v not in action.choices:
            raise ValueError(f"{value!r} is not one of {', '.join(map(str, action.choices))}")
        return v

    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        count = f"{action.nargs} values" if isinstance(action.nargs, int) else "a list of values"
        if not isinstance(value, (list, tuple)) or (isinstance(action.nargs, int) and len(value) != action.nargs):
            raise ValueError(f"{value!r} is not {count}")
        return [one(v) for v in value]
    if isinstance(value, (list, dict)) and action.type in (int, float):
        raise ValueError(f"{value!r} is not {'an integer' if action.type is int else 'a number'}")
    return one(value)


# flag → (lowest, highest, whether the lowest is allowed); None: unbounded on that side
RANGES = {
    "lr": (0, None, True), "min_lr_ratio": (0, 1, True), "weight_decay": (0, None, True), "eps": (0, None, False),
    "clip": (0, None, True), "caption_drop": (0, 1, True), "diffusion_loss_weight": (0, None, True),
    "betas": (0, 1, True), "minutes": (0, None, False),
    "batch_size": (1, None, True), "grad_accum": (1, None, True), "threads": (1, None, True),
    "keep_checkpoints": (1, None, True), "log_every": (1, None, True), "calibrate_steps": (1, None, True),
    "max_examples": (1, None, True), "max_text_tokens": (2, None, True),
    "workers": (0, None, True), "save_every": (0, None, True), "sample_every": (0, None, True),
    "warmup_steps": (0, None, True), "stop_at_step": (1, None, True), "noise_limit": (0, None, True),
    "lora_rank": (0, None, True), "lora_alpha": (0, None, False), "lora_dropout": (0, 1, True),
}  # fmt: skip
NOTES = {"clip": " (0 disables clipping)", "save_every": " (0: only at the end)",
         "sample_every": " (0: at the end only)", "noise_limit": " (0 disables it)", "betas": ", below 1"}  # fmt: skip


def check_ranges(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every number flag must be finite and in its range; the message names the flag and the range."""
    numeric = [a for a in parser._actions if a.type in (int, float)]
    for action in numeric:
        value = getattr(args, action.dest)
        if value is None:
            continue
        flag = f"--{action.dest.replace('_', '-')}"
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if not math.isfinite(v):
                parser.error(f"{flag}={v}: must be a finite number")
        if action.dest not in RANGES:
            continue
        low, high, low_ok = RANGES[action.dest]
        for v in value if isinstance(value, (list, tuple)) else [value]:
            below = v < low if low_ok else v <= low
            above = high is not None and (v >= high if action.dest == "betas" else v > high)
            if below or above:
                allowed = f"{'≥' if low_ok else '>'} {low}" + (
                    f" and ≤ {high}" if high is not None and action.dest != "betas" else ""
                )
                parser.error(f"{flag}={v}: must be {allowed}{NOTES.get(action.dest, '')}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        try:
            values = load_config_file(pre.config)
        except (OSError, ValueError) as err:
            parser.error(f"--config {pre.config}: {err}")
        actions = {a.dest: a for a in parser._actions}
        unknown = sorted(set(values) - set(actions) - {"config"})
        if unknown:
            parser.error(f"--config {pre.config}: unknown key(s) {unknown}; the keys are this script's flags")
        for key in set(values) - {"config"}:
            try:
                values[key] = _config_value(actions[key], values[key])
            except ValueError as err:
                parser.error(f"--config {pre.config}: {key} (--{key.replace('_', '-')}): {err}")
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    from training.collate import parse_image_first, parse_mix
    from training.datasets import builtin_names, source_names

    try:
        names = source_names(args)  # built in, then --dataset names (a bad --dataset spec is a usage error here)
        user = names[len(builtin_names()) :]
        args.image_first_prob = parse_image_first(args.image_first_prob, builtin_names("image") + user)
        if args.mix != "size":
            parse_mix(args.mix, names)  # checked here for a usage error; main() parses it again
        elif not args.dataset:
            raise ValueError("--mix size weights the --dataset sources by their size: give --dataset NAME=PATH")
        if args.base and args.init_from:
            raise ValueError(
                "--base fine-tunes a saved model as it is; --init-from starts these flags' model from weights: give one"
            )
    except ValueError as err:
        parser.error(str(err))
    check_ranges(parser, args)
    if args.max_steps is not None and args.max_steps < 0:
        parser.error(f"--max-steps={args.max_steps}; must be ≥ 1 (or 0: none, the schedule follows --minutes)")
    args.max_steps = args.max_steps or None
    if args.mixed_precision not in (None, "no", "bf16", "fp16"):
        parser.error(f"mixed_precision={args.mixed_precision!r}; allowed: no, bf16, fp16")
    return args
