"""Assemble model + VAE + scheduler + tokenizer into a Hub-ready TransfusionPipeline folder with a model card.

    python -m conversion.export_pipeline --model checkpoints/transfusion-tiny --output runs/export
    python -m conversion.export_pipeline --model runs/transfusion/final --vae checkpoints/vae --scheduler dpm \\
        --lora runs/lora-purple --output runs/export-purple
    python -m conversion.export_pipeline --model checkpoints/transfusion-tiny --output runs/export \
        --push-to-hub you/transfusion-tiny
    python -m conversion.export_pipeline --refresh-code checkpoints/transfusion-tiny

`--model` is a saved pipeline folder (`model_index.json`) or a model folder (`config.json` of model_type
"transfusion"; the tokenizer next to it or in `--tokenizer`). `--vae` replaces the VAE weights (its config must equal
the model's `vae_config`), `--lora` fuses a LoRA adapter into the weights before saving. The folder is written by
`TransfusionPipeline.save_pretrained`, so it carries its own code and loads with `TransfusionPipeline.from_pretrained`,
`DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` and `AutoModelForCausalLM.from_pretrained(...,
subfolder="transformer", trust_remote_code=True)`. `--push-to-hub REPO_ID` uploads it afterwards (needs `hf auth login`
or `--token`; creates the repository if needed).
"""

import argparse
import json
from pathlib import Path

from modeling_transfusion.scheduling_transfusion import SCHEDULER_NAMES

CARD_TEMPLATE = """---
{metadata}
---

# {title}

A [Transfusion](https://arxiv.org/abs/2408.11039) model (Zhou et al. 2024): one Llama-style transformer trained with
next-token prediction on text and diffusion on VAE latents, so the same weights write text, generate images and
caption them. The folder holds the `transformers` model (`transformer/`, with the VAE inside it), the diffusers
scheduler, the tokenizer and the code to load them.

| | |
|---|---|
| Parameters | {parameters} transformer + {vae_parameters} VAE |
| Backbone | {layers} layers, width {hidden}, {heads} heads ({kv_heads} key/value), vocabulary {vocab} |
| Images | {image_size}×{image_size} px → {latent_channels}×{latent_size}×{latent_size} latents, \
{patch}×{patch} patches ({slots} slots per image), {encoder} patch encoder |
| Diffusion | {diffusion} ({prediction}), λ = {weight}; sampling scheduler `{scheduler}` |
{base_row}
{description}

## Use

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{repo}", trust_remote_code=True)
image = pipe("{prompt}", num_inference_steps=25, guidance_scale=3.0,
             generator=torch.Generator().manual_seed(0)).images[0]
print(pipe.caption(image))          # image → text with the same model
```

The model alone, with `transformers`:

```python
from transformers import AutoModelForCausalLM, AutoProcessor

model = AutoModelForCausalLM.from_pretrained("{repo}", subfolder="transformer", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{repo}", subfolder="transformer", trust_remote_code=True)
```

LoRA adapters (PEFT folders) load with `pipe.load_lora_weights(path)`; `pipe.fuse_lora()` and
`pipe.unload_lora_weights()` fold them into the weights or remove them.
"""


def load_components(model_path, tokenizer_path=None):
    """(model, tokenizer, scheduler or None) from a pipeline folder or a model folder."""
    from transformers import AutoTokenizer

    import modeling_transfusion  # noqa: F401  (registers the Auto classes)
    from modeling_transfusion import TransfusionPipeline

    root = Path(model_path)
    if (root / "model_index.json").exists():
        pipe = TransfusionPipeline.from_pretrained(root)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path) if tokenizer_path else pipe.tokenizer
        return pipe.transformer, tokenizer, pipe.scheduler
    config_path = root / "config.json"
    if not config_path.exists():
        raise ValueError(f"{root} is neither a pipeline folder (model_index.json) nor a model folder (config.json)")
    model_type = json.loads(config_path.read_text()).get("model_type")
    if model_type != "transfusion":
        raise ValueError(
            f"{root} holds a {model_type!r} model; convert it first (conversion/convert_llama_to_transfusion.py)"
        )
    from modeling_transfusion import TransfusionForCausalLM

    model = TransfusionForCausalLM.from_pretrained(root)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or root)
    return model, tokenizer, None


def make_scheduler(model, name: str | None = None, current=None, overrides: dict | None = None):
    """The sampling scheduler: `name` (see pipelines' SCHEDULER_NAMES), else `current`, else DDIM (flow-euler for
    flow-matching models), configured from the model's training noise schedule, with `overrides` of that config
    (e.g. {"algorithm_type": "sde-dpmsolver++"})."""
    from modeling_transfusion.scheduling_transfusion import reconfigure_scheduler, scheduler_class

    if overrides:
        return reconfigure_scheduler(make_scheduler(model, name, current), overrides)
    if name is None and current is not None:
        return current
    config = model.config
    name = name or ("flow-euler" if config.diffusion_type == "flow_matching" else "ddim")
    return scheduler_class(name, config.diffusion_type).from_config(config.scheduler_config())


def replace_vae(model, vae_path) -> None:
    """Load an AutoencoderKL's weights into the model's VAE; ValueError naming the differing config fields."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_path)
    given = json.loads(json.dumps({k: v for k, v in dict(vae.config).items() if not k.startswith("_")}))
    ours = model.config.vae_config
    differ = {k: (ours.get(k), given.get(k)) for k in set(ours) | set(given)
              if k in ours and ours.get(k) != given.get(k)}
    if differ:
        pairs = ", ".join(f"{k}: model {a!r} vs VAE {b!r}" for k, (a, b) in sorted(differ.items()))
        raise ValueError(f"The VAE in {vae_path} does not match the model's vae_config: {pairs}")
    model.model.vae.load_state_dict(vae.state_dict())
    model.model.vae.requires_grad_(False)


def model_card(pipe, repo_id: str | None = None, base_model: str | None = None, description: str = ""):
    """A `huggingface_hub.ModelCard` describing the pipeline, with usage code for `repo_id`."""
    from huggingface_hub import ModelCard, ModelCardData

    model, c = pipe.transformer, pipe.transformer.config
    vae_parameters = sum(p.numel() for p in model.model.vae.parameters())
    total = sum(p.numel() for p in model.parameters())
    data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=["transfusion", "text-to-image", "image-to-text", "text-generation", "diffusers", "transformers"],
        base_model=base_model if base_model and "/" in base_model and not Path(base_model).exists() else None,
    )
    text = CARD_TEMPLATE.format(
        metadata=data.to_yaml(),
        title=f"Transfusion — {repo_id.split('/')[-1]}" if repo_id else "Transfusion",
        description=description.strip(),
        parameters=f"{(total - vae_parameters) / 1e6:.2f} M",
        vae_parameters=f"{vae_parameters / 1e6:.2f} M",
        layers=c.num_hidden_layers,
        hidden=c.hidden_size,
        heads=c.num_attention_heads,
        kv_heads=c.num_key_value_heads,
        vocab=c.vocab_size,
        image_size=c.image_size,
        latent_channels=c.latent_channels,
        latent_size=c.latent_size,
        patch=c.patch_size,
        slots=c.image_slots,
        encoder=c.patch_encoder,
        diffusion=c.diffusion_type,
        prediction=c.prediction_type,
        weight=c.diffusion_loss_weight,
        scheduler=type(pipe.scheduler).__name__
        + (f" ({pipe.scheduler.config['algorithm_type']})" if "algorithm_type" in pipe.scheduler.config else ""),
        base_row=f"| Text initialised from | {base_model} |\n" if base_model else "",
        repo=repo_id or "path/to/this/folder",
        prompt="a blue circle to the left of a yellow triangle",  # drawn right at seed 0 (the card says which is not)
    )
    return ModelCard(text)


def save_pipeline(model, tokenizer, output, scheduler=None, repo_id=None, base_model=None, description="") -> Path:
    """Write the pipeline folder (TransfusionPipeline.save_pretrained) and its README.md model card."""
    from modeling_transfusion import TransfusionPipeline

    pipe = TransfusionPipeline(transformer=model, scheduler=make_scheduler(model, current=scheduler),
                               tokenizer=tokenizer)
    output = Path(output)
    pipe.save_pretrained(output)
    model_card(pipe, repo_id, base_model, description).save(output / "README.md")
    return output


def push_to_hub(folder, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload `folder` to the Hub model repository `repo_id` (created if missing); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                               commit_message="Upload Transfusion pipeline")  # fmt: skip
    return str(commit)


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m conversion.export_pipeline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="pipeline folder or Transfusion model folder")
    p.add_argument("--output", help="folder to write (not the --model folder itself)")
    p.add_argument("--refresh-code", metavar="FOLDER",
                   help="only copy this package's code files into a saved pipeline folder (root and transformer/)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: next to the model)")
    p.add_argument("--vae", help="AutoencoderKL folder whose weights replace the model's VAE")
    p.add_argument("--lora", help="LoRA adapter folder to fuse into the weights before saving")
    p.add_argument("--scheduler", choices=sorted(SCHEDULER_NAMES), help="sampling scheduler (default: keep, else ddim)")
    p.add_argument("--scheduler-config", type=json.loads, default={},
                   help="JSON overrides of the sampling scheduler config, "
                   'e.g. \'{"algorithm_type": "sde-dpmsolver++"}\'')
    p.add_argument("--description", default="", help="a paragraph for the model card (or @file to read it from)")
    p.add_argument("--base-model", help="Hub id of the model the text part was initialised from (card metadata)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the folder to this Hub repository afterwards")
    p.add_argument("--private", action="store_true", help="create the Hub repository as private")
    p.add_argument("--token", help="Hub token (default: the stored login)")
    args = p.parse_args(argv)
    if args.refresh_code:
        from modeling_transfusion.pipeline_transfusion import save_code

        if not (Path(args.refresh_code) / "model_index.json").is_file():
            p.error(f"--refresh-code {args.refresh_code}: not a saved pipeline folder (no model_index.json)")
        written = save_code(args.refresh_code)
        print(f"copied {len(written)} code files into {args.refresh_code}/ and {args.refresh_code}/transformer/")
        return Path(args.refresh_code)
    if not args.model or not args.output:
        p.error("--model and --output are required (or --refresh-code FOLDER)")
    if Path(args.output).resolve() == Path(args.model).resolve():
        p.error("--output must be a new folder: the weights are read from --model while the pipeline is written")

    model, tokenizer, scheduler = load_components(args.model, args.tokenizer)
    if args.vae:
        replace_vae(model, args.vae)
    if args.lora:
        from modeling_transfusion import TransfusionPipeline

        pipe = TransfusionPipeline(transformer=model, scheduler=make_scheduler(model, current=scheduler),
                                   tokenizer=tokenizer)
        pipe.load_lora_weights(args.lora)
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # the fused weights stay, saved under plain keys
    description = Path(args.description[1:]).read_text() if args.description.startswith("@") else args.description
    out = save_pipeline(model, tokenizer, args.output,
                        make_scheduler(model, args.scheduler, scheduler, args.scheduler_config),
                        args.push_to_hub, args.base_model, description)  # fmt: skip
    print(f"wrote the pipeline folder with a model card to {out}/")
    if args.push_to_hub:
        url = push_to_hub(out, args.push_to_hub, args.private, args.token)
        print(f"pushed {out}/ to https://huggingface.co/{args.push_to_hub} ({url})")
    return out


if __name__ == "__main__":
    main()
