"""The transfusion-pytorch side of bench/bench_vs_transfusion_pytorch.py. Runs inside the benchmark's own venv (the
one that has `transfusion-pytorch`), never in the project's: it imports nothing from this repository.

Protocol: one JSON object per line on stdin, one JSON answer per line on stdout (logs go to stderr).
    {"op": "init", "config": {...}}    → {"parameters": …, "train_tokens_per_row": …, "versions": {…}}
    {"op": "train"}                    → {"seconds": …}                       one optimizer step on the fixed batch
    {"op": "sample", "steps": N}       → {"seconds": …, "model_calls": …, …}  one image, N model evaluations
    {"op": "quit"}
Each answer times only the work itself, not the pipe.
"""

import json
import os
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # sample_one draws a progress bar per call

import torch  # noqa: E402
from einops.layers.torch import Rearrange  # noqa: E402
from loguru import logger  # noqa: E402
from transfusion_pytorch import Transfusion  # noqa: E402


class Worker:
    def init(self, config: dict) -> dict:
        """Build their model at our sizes. `config` is the dict that the benchmark sends (see `their_config` there)."""
        torch.set_num_threads(config["threads"])
        torch.manual_seed(config["seed"])
        c, p = config["latent_channels"], config["patch_size"]
        # Their latent projection is one Linear(dim_latent → dim) over channel-last tokens; the einops patchify in
        # front of it makes (C, h, w) latents the same 16-dim patch tokens that our linear patch encoder embeds.
        patchify = Rearrange("b c (h p1) (w p2) -> b h w (c p1 p2)", p1=p, p2=p)
        unpatchify = Rearrange("b h w (c p1 p2) -> b c (h p1) (w p2)", c=c, p1=p, p2=p)
        grid = config["latent_size"] // p
        self.model = Transfusion(
            num_text_tokens=config["vocab_size"],
            dim_latent=c * p * p,
            modality_default_shape=(grid, grid),
            modality_encoder=patchify,
            modality_decoder=unpatchify,
            prob_uncond=0.0,  # our side trains with caption_drop_prob = 0 too
            odeint_kwargs=dict(method="euler"),  # fixed grid: one model evaluation per interval
            transformer=dict(
                dim=config["hidden_size"],
                depth=config["num_hidden_layers"],
                heads=config["num_attention_heads"],
                dim_head=config["hidden_size"] // config["num_attention_heads"],
                ff_expansion_factor=config["ff_expansion_factor"],
                **config["transformer_overrides"],
            ),
        )
        self.grid = (grid, grid)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)

        g = torch.Generator().manual_seed(config["seed"])
        vocab, n_prompt, n_suffix = config["vocab_size"], config["prompt_tokens"], config["suffix_tokens"]
        self.batch = [
            [
                torch.randint(0, vocab, (n_prompt,), generator=g),
                torch.randn(c, config["latent_size"], config["latent_size"], generator=g),
                torch.randint(0, vocab, (n_suffix,), generator=g),
            ]
            for _ in range(config["batch"])
        ]
        self.prompt = torch.randint(0, vocab, (config["sample_prompt_tokens"],), generator=g)

        self.calls = 0
        forward = self.model.forward

        def counted(*args, **kwargs):
            self.calls += 1
            return forward(*args, **kwargs)

        self.model.forward = counted
        # their sequence: [sos] prompt [meta] "4,4" [som] image [eom] suffix [eos], shifted by one for the labels
        meta = 1 + len(",".join(map(str, self.grid))) + 1 + 1
        return {
            "parameters": sum(q.numel() for q in self.model.parameters()),
            "train_tokens_per_row": 1 + n_prompt + meta + grid * grid + n_suffix + 1 - 1,
            "versions": {
                "transfusion_pytorch": _version(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            },
        }

    def train(self) -> dict:
        self.model.train()
        start = time.perf_counter()
        loss = self.model(self.batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"seconds": time.perf_counter() - start, "loss": loss.item()}

    def sample(self, steps: int) -> dict:
        """One image right after the text prompt: forced [som] with the image shape, no guidance, Euler over
        `steps + 1` times (= `steps` evaluations), stopped at the image's [eom] before any text is decoded."""
        self.calls = 0
        length = self.grid[0] * self.grid[1]
        start = time.perf_counter()
        out = self.model.sample_one(
            prompt=self.prompt,
            force_modality_at_start=(0, self.grid),
            modality_steps=steps + 1,
            cfg_scale=1.0,
            max_length=length - 1,  # the loop runs while decoded length ≤ max_length: one image, then stop
            cache_kv=True,
            return_without_prompt=True,
        )
        seconds = time.perf_counter() - start
        shapes = [list(item.tensor.shape) for item in out if hasattr(item, "modality_type")]
        return {"seconds": seconds, "model_calls": self.calls, "image_shapes": shapes}


def _version() -> str:
    from importlib.metadata import version

    return version("transfusion-pytorch")


def main():
    logger.remove()  # sample_one logs at INFO on every call
    logger.add(sys.stderr, level="WARNING")
    worker = Worker()
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        if op == "quit":
            break
        if op == "init":
            answer = worker.init(request["config"])
        elif op == "train":
            answer = worker.train()
        elif op == "sample":
            answer = worker.sample(int(request["steps"]))
        else:
            answer = {"error": f"unknown op {op!r}; expected init, train, sample or quit"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
