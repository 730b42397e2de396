"""Transfusion Space: text → image, image editing by instruction, image → text and a chat whose replies can hold
images, from one model.

    python space/app.py                                  # checkpoints/transfusion-tiny-instruct on 127.0.0.1:7860
    python space/app.py --model PATH_OR_HUB_ID --host 0.0.0.0 --port 7861 --concurrency 2
    TRANSFUSION_MODEL=user/transfusion-tiny python space/app.py

As a Hugging Face Space (this folder is then the Space's repository root) the model is the folder or Hub id in the
`TRANSFUSION_MODEL` variable, else `checkpoints/transfusion-tiny-instruct` next to app.py (the instruction-tuned model,
which edits and chats), else `checkpoints/transfusion-tiny`; see README.md.

API (gradio_client): `/generate`, `/edit`, `/caption` and `/chat`. Inputs reach the handlers unprocessed
(`preprocess=False`) so that every bad value — from the UI or the API — gets a message naming it and its accepted range.

An edit is `pipe(instruction, image=source)`: the source image and the instruction make the user's turn, the edited
image is drawn as the answer (image guidance > 0 adds InstructPix2Pix guidance; examples/ holds example sources). The
chat hands the model the real conversation, the Chatbot's user and assistant turns with their text and images, laid out
by the processor (`user:` … `assistant:` … `<|eos|>`); the oldest turns are dropped when it no longer fits the model's
positions with the reply's new tokens and images.

Every model call borrows one of N light copies of the pipeline (shared weights; own scheduler and tokenizer, because
a scheduler keeps per-run state and a fast tokenizer refuses concurrent use), N being the queue's concurrency limit.
"""

import argparse
import atexit
import bisect
import copy
import json
import math
import os
import queue
import secrets
import shutil
import stat
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder, is_in_or_equal
import numpy as np
import PIL.Image
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

APP_DIR = Path(__file__).resolve().parent
# In the repository the app sits in space/ beside the `pipelines` package; as a Space, its folder is the root.
ROOT = APP_DIR.parent if (APP_DIR.parent / "pipelines").is_dir() else APP_DIR
# The instruction-tuned model edits and chats; the base model only draws from captions, captions and writes text.
DEFAULT_MODELS = (ROOT / "checkpoints" / "transfusion-tiny-instruct", ROOT / "checkpoints" / "transfusion-tiny")
EXAMPLES_DIR = APP_DIR / "examples"  # the Edit tab's example source images (examples/make_examples.py)

MAX_STEPS, MAX_GUIDANCE, MAX_IMAGES = 250, 20.0, 8
MAX_SIDE, MAX_UPLOAD_MB = 4096, 20
MAX_NEW_TOKENS, MAX_CHAT_IMAGES, MAX_TEMPERATURE = 256, 4, 2.0
MAX_SEED = 2**31 - 1
EMPTY_REPLY = "(the model gave an empty reply)"  # shown in the chat, never read back as the model's turn
EXAMPLES = (
    "a photo of a dress",
    "a photo of a sneaker",
    "a red circle",
    "two blue triangles",
    "a green circle to the left of a red square",
)
# Dropdown name → (scheduler class, overrides), built from the checkpoint's own scheduler config.
SCHEDULERS = {
    "DDIM": (DDIMScheduler, {}),
    "DPM-Solver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "DPM-Solver++ SDE": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    "DDPM": (DDPMScheduler, {}),
    "Euler": (EulerDiscreteScheduler, {}),
}
FLOW_SCHEDULERS = {"Euler": (FlowMatchEulerDiscreteScheduler, {})}
CSS = """
#gallery img, #edited img, #chatbot img, #caption-image img, #edit-image img, #edit-examples img {
  image-rendering: pixelated;
}
#chatbot .message img { width: 128px; height: 128px; object-fit: contain; }
#caption-image img, #edit-image img { width: 256px; height: 256px; object-fit: contain; }
"""


class RunCancelled(Exception):
    """Raised from the step callback when the event that started a run was cancelled."""


# -- loading -------------------------------------------------------------------------------------------------------
def resolve_model(model: str | Path | None = None) -> str:
    """`--model`, else `TRANSFUSION_MODEL`, else the first bundled checkpoint there is (the instruction-tuned one)."""
    default = next((folder for folder in DEFAULT_MODELS if folder.is_dir()), DEFAULT_MODELS[-1])
    return str(model or os.environ.get("TRANSFUSION_MODEL") or default)


def load_pipeline(model: str | Path | None = None, device: str | None = None):
    """Load a saved TransfusionPipeline folder, a bare model folder (as training writes it) or a Hub id; a clear error
    when there is none."""
    name = resolve_model(model)
    path = Path(name).expanduser()
    is_hub_id = not path.exists() and not path.is_absolute() and name.count("/") == 1 and not name.startswith(".")
    if not path.exists() and not is_hub_id:
        raise SystemExit(
            f"No Transfusion checkpoint at {path}.\n"
            "Train one with `python -m training.train --config training/configs/transfusion-tiny.yaml` (its model "
            "folder, runs/transfusion-tiny/final, loads with --model too) and save it there as a TransfusionPipeline, "
            "or point --model / TRANSFUSION_MODEL at a saved pipeline folder or a Hub id (owner/name)."
        )
    try:
        from pipelines import TransfusionPipeline  # the repository's code (importing it registers the model classes)
    except ImportError:  # a Space without the repository: the pipeline code saved with the checkpoint
        TransfusionPipeline = None
    if path.exists() and not (path / "model_index.json").is_file():
        if TransfusionPipeline is None or not (path / "config.json").is_file():
            raise SystemExit(f"{path} is not a saved TransfusionPipeline: it has no model_index.json")
        pipe = pipeline_from_model_folder(TransfusionPipeline, path)
    elif TransfusionPipeline is None:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(str(path) if path.exists() else name, trust_remote_code=True)
    else:
        try:
            pipe = TransfusionPipeline.from_pretrained(str(path) if path.exists() else name)
        except OSError as err:
            raise SystemExit(f"Could not load {name!r} as a local folder or from the Hub: {err}") from err
    pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_from_model_folder(pipeline_class, path: Path):
    """A pipeline around a transformers model folder: its tokenizer, and its training noise schedule sampled with
    DDIM (or flow-matching Euler)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    config = model.config.scheduler_config()
    scheduler_class = FlowMatchEulerDiscreteScheduler if "FlowMatch" in config["_class_name"] else DDIMScheduler
    return pipeline_class(
        transformer=model, scheduler=scheduler_class.from_config(config), tokenizer=AutoTokenizer.from_pretrained(path)
    )


class PipelinePool:
    """`size` copies of one pipeline sharing its weights, each with its own scheduler and tokenizer."""

    def __init__(self, pipe, size: int):
        self.free: queue.Queue = queue.Queue()
        for _ in range(size):
            view = type(pipe)(
                transformer=pipe.transformer,
                scheduler=copy.deepcopy(pipe.scheduler),
                tokenizer=copy.deepcopy(pipe.tokenizer),
            )
            view.set_progress_bar_config(disable=True)
            self.free.put(view)

    @contextmanager
    def borrow(self, timeout: float = 600.0):
        try:
            view = self.free.get(timeout=timeout)
        except queue.Empty:
            raise gr.Error("The model is busy; try again in a minute.") from None
        try:
            yield view
        finally:
            self.free.put(view)


# -- input checks ----------------------------------------------------------------------------------------------------
class InputError(gr.Error):
    """A handled problem with a request's input: shown to the user, logged as one line (no traceback)."""

    def __init__(self, message: str):
        super().__init__(message, print_exception=False)
        print(f"refused a request: {message}", file=sys.stderr, flush=True)


def check_number(value, name: str, low: float, high: float, integer: bool = False):
    """A raw UI/API value → int or float in [low, high], or a gr.Error naming the value and the range."""
    kind = "a whole number" if integer else "a number"
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or (integer and number != int(number)):
        raise InputError(f"{name} must be {kind} from {low:g} to {high:g}, got {value!r}.")
    if not low <= number <= high:
        raise InputError(f"{name} must be from {low:g} to {high:g}, got {number:g}.")
    return int(number) if integer else number


def check_text(value, name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(f"{name} must be text, got {type(value).__name__}.")
    return " ".join(value.split())


class NotUploadedError(InputError):
    """A file the request names that gradio did not receive (a server path, a special file)."""


NOT_UPLOADED = ("The image file was not uploaded to this server; upload the image itself "
                "(gradio_client: handle_file(path)).")


def upload_path(file) -> str | None:
    """The server path of a file gradio received for a request (in its upload folder), or InputError.

    Inputs reach the handlers unprocessed, so a client can name any server path, with or without gradio's `meta`
    marker; gradio's own rule for inputs (only files in its upload folder) is applied here. A path outside it gets
    one answer whether or not it exists, and only a regular file is ever opened (a FIFO or device would block)."""
    path = file.get("path") if isinstance(file, dict) else file
    if path is None or path == "":
        return None
    if not isinstance(path, str):
        raise InputError(f"An image must be an uploaded file, got {type(path).__name__}.")
    real = os.path.realpath(path)  # symlinks and '..' resolved before the check
    if not is_in_or_equal(real, os.path.realpath(get_upload_folder())):
        raise NotUploadedError(NOT_UPLOADED)
    try:
        mode = os.stat(real).st_mode
    except OSError:
        raise InputError("The uploaded file is no longer on the server; upload it again.") from None
    if not stat.S_ISREG(mode):
        raise NotUploadedError(NOT_UPLOADED)
    return real


def to_model_image(image: PIL.Image.Image, processor) -> tuple[PIL.Image.Image, str]:
    """Any PIL image → the RGB image the model sees (the processor's EXIF, transparency and aspect-keeping padding),
    and a note of what was done. 16-bit and float images, which the processor refuses, are stretched to 8 bits first."""
    source = f"{image.width}×{image.height} {image.mode}"
    steps = []
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # 16-bit / float: stretch to 8 bits
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        image = PIL.Image.fromarray(((values - low) / ((high - low) or 1.0) * 255).round().astype(np.uint8), "L")
        steps.append("values rescaled to 8 bits")
    image, processed = processor.prepare_image(image)
    steps += processed
    size = processor.image_size
    if source == f"{size}×{size} RGB":
        return image, f"{source}, used as is"
    return image, f"{source} → {size}×{size} RGB" + (f" ({', '.join(steps)})" if steps else "")


def read_image(file, processor, missing: str = "Upload an image first.") -> tuple[PIL.Image.Image, str]:
    """An uploaded file → a model-ready image and a note, or a gr.Error saying why it cannot be read (`missing` when
    there is no file)."""
    path = upload_path(file)
    if not path:
        raise InputError(missing)
    try:
        megabytes = os.path.getsize(path) / 2**20
    except OSError:
        raise InputError("The uploaded file is no longer on the server; upload it again.") from None
    if megabytes > MAX_UPLOAD_MB:
        raise InputError(f"The upload is {megabytes:.1f} MB; the limit is {MAX_UPLOAD_MB} MB.")
    try:
        with PIL.Image.open(path) as image:  # reads the header only: the size is checked before decoding
            if max(image.size) > MAX_SIDE:
                raise InputError(f"The image is {image.width}×{image.height} px; the limit is {MAX_SIDE} px per side.")
            image.load()
            return to_model_image(image, processor)
    except gr.Error:
        raise
    except Exception as err:  # a user's file can fail in many ways (truncated, not an image, decompression bomb)
        raise InputError(
            f"Could not read the upload as an image ({type(err).__name__}: {err}). Upload a PNG, JPEG, WebP, GIF "
            "or BMP file."
        ) from None


def stream_run(pool: PipelinePool, run, preview_every: int):
    """Run `run(pipe, callback)` on a worker thread with a borrowed pipeline. Yields `("step", i, total, previews)`
    after each denoising step (`previews` decoded from the latents every `preview_every` steps, else None), then
    `("done", result)`. Closing the generator (a cancelled event) stops the run at its next step."""
    events: queue.Queue = queue.Queue()
    stop = threading.Event()

    def callback(pipe, i, t, tensors):
        if stop.is_set():
            raise RunCancelled()
        total = getattr(pipe, "_num_timesteps", None) or i + 1
        due = (i + 1) % preview_every == 0 and i + 1 < total
        events.put(("step", i + 1, total, pipe.postprocess(tensors["latents"]) if due else None))
        return {}

    def worker():
        try:
            with pool.borrow() as pipe:
                events.put(("done", run(pipe, callback)))
        except BaseException as err:  # handed to the consumer, which re-raises it in the request
            events.put(("error", err))

    threading.Thread(target=worker, daemon=True).start()
    try:
        while True:
            event = events.get()
            if event[0] == "error":
                error = event[1]
                if isinstance(error, ValueError) and not isinstance(error, gr.Error):
                    raise InputError(str(error)) from error
                raise error
            yield event
            if event[0] == "done":
                return
    finally:
        stop.set()


# -- the app ---------------------------------------------------------------------------------------------------------
class TransfusionSpace:
    """Handlers of the four tabs around one loaded pipeline."""

    def __init__(self, pipe, concurrency: int = 2):
        self.pipe = pipe
        self.config = pipe.transformer.config
        self.pool = PipelinePool(pipe, concurrency)
        self.tokenizer_lock = threading.Lock()  # the base pipeline's tokenizer only counts tokens
        # chat images are written here for gradio to copy into its cache (which `delete_cache` empties hourly)
        self.image_dir = Path(tempfile.mkdtemp(prefix="transfusion-space-"))
        atexit.register(shutil.rmtree, self.image_dir, ignore_errors=True)
        flow = getattr(self.config, "diffusion_type", "ddpm") == "flow_matching"
        self.schedulers = FLOW_SCHEDULERS if flow else SCHEDULERS
        loaded = pipe.scheduler
        matches = [
            name
            for name, (cls, overrides) in self.schedulers.items()
            if type(loaded) is cls and all(loaded.config.get(k) == v for k, v in overrides.items())
        ]  # the checkpoint's own sampler, variant included
        self.default_scheduler = matches[0] if matches else next(iter(self.schedulers))
        self.default_steps = int(pipe.config.get("default_inference_steps") or 25)  # what pipe(...) itself uses
        self.image_cost = self.config.image_slots + 2  # <|boi|> slots <|eoi|>

    # helpers
    def count_tokens(self, text: str) -> int:
        with self.tokenizer_lock:
            return len(self.pipe.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    def make_scheduler(self, name: str):
        cls, overrides = self.schedulers[name]
        return cls.from_config(self.pipe.scheduler.config, **overrides)

    def count_positions(self, row) -> int:
        """The positions the processor lays `row` out in (a conversation, or text and images), `<|bos|>` included."""
        with self.tokenizer_lock:
            return len(self.pipe.processor(row)["input_ids"][0])

    def check_prompt_length(self, text: str, name: str, around: list | None = None) -> None:
        """`text` must leave room for the image to generate in the model's positions, next to `around` (the rest of
        the row it goes into; None: only `<|bos|>`)."""
        taken = 1 if around is None else self.count_positions(around)
        limit = self.config.max_position_embeddings - self.image_cost - taken
        n = self.count_tokens(text)
        if n > limit:
            raise InputError(f"{name} is {n} tokens long; this model takes at most {limit}.")

    def save_image(self, image: PIL.Image.Image) -> str:
        """A PNG for the chat; files older than an hour (long since copied by gradio) are removed on the way."""
        cutoff = time.time() - 3600
        for old in self.image_dir.glob("*.png"):
            if old.stat().st_mtime < cutoff:
                old.unlink(missing_ok=True)
        path = self.image_dir / f"{uuid.uuid4().hex}.png"
        image.save(path)
        return str(path)

    def seed(self, value) -> int:
        seed = check_number(value, "Seed", -1, MAX_SEED, integer=True)
        return secrets.randbelow(MAX_SEED + 1) if seed == -1 else seed

    # text → image and editing: one sampling run
    def check_sampling(self, steps, guidance, scheduler) -> tuple[int, float, str]:
        """Steps, guidance scale and scheduler name, checked (None: the checkpoint's own steps and scheduler)."""
        steps = check_number(self.default_steps if steps is None else steps, "Steps", 1, MAX_STEPS, integer=True)
        guidance = check_number(guidance, "Guidance scale", 0, MAX_GUIDANCE)
        scheduler = self.default_scheduler if scheduler is None else scheduler
        if scheduler not in self.schedulers:
            raise InputError(f"Scheduler must be one of {', '.join(self.schedulers)}, got {scheduler!r}.")
        return steps, guidance, scheduler

    def sample(self, call: dict, scheduler: str, seed: int, settings: str, progress):
        """`pipe(**call)` with `scheduler` and `seed` on a borrowed pipeline: yields (previews, status) while denoising,
        then (images, status); `settings` describes the run in the final status."""
        steps = call["num_inference_steps"]

        def run(pipe, callback):
            pipe.scheduler = self.make_scheduler(scheduler)
            generator = torch.Generator().manual_seed(seed)
            return pipe(**call, generator=generator, callback_on_step_end=callback).images

        started = time.perf_counter()
        progress(0, desc="Encoding the prompt")
        for event in stream_run(self.pool, run, preview_every=max(1, steps // 8)):
            if event[0] == "step":
                _, i, total, previews = event
                progress((i, total), desc="Denoising", unit="steps")
                if previews is not None:
                    yield previews, f"Denoising… step {i}/{total}"
            else:
                images = event[1]
        seconds = time.perf_counter() - started
        noun = "image" if len(images) == 1 else "images"
        yield images, f"{len(images)} {noun} in {seconds:.1f} s · {scheduler}, {steps} steps, {settings}, seed {seed}"

    def generate(self, prompt, negative_prompt="", steps=None, guidance=3.0, seed=0, scheduler=None, num_images=1,
                 progress=gr.Progress()):  # fmt: skip
        """API defaults: no negative prompt, the checkpoint's own step count and scheduler, guidance 3, seed 0, one
        image."""
        prompt = check_text(prompt, "Prompt")
        if not prompt:
            raise InputError("Enter a prompt, e.g. 'a red circle'.")
        negative_prompt = check_text(negative_prompt, "Negative prompt")
        steps, guidance, scheduler = self.check_sampling(steps, guidance, scheduler)
        num_images = check_number(num_images, "Number of images", 1, MAX_IMAGES, integer=True)
        self.check_prompt_length(prompt, "The prompt")
        self.check_prompt_length(negative_prompt, "The negative prompt")
        call = {"prompt": prompt, "negative_prompt": negative_prompt or None, "num_inference_steps": steps,
                "guidance_scale": guidance, "num_images_per_prompt": num_images}  # fmt: skip
        yield from self.sample(call, scheduler, self.seed(seed), f"guidance {guidance:g}", progress)

    def edit(self, image, instruction, steps=None, guidance=3.0, image_guidance=0.0, seed=0, scheduler=None,
             progress=gr.Progress()):  # fmt: skip
        """The image edited as the instruction says. API defaults: the checkpoint's own step count and scheduler,
        guidance 3, image guidance off (0), seed 0."""
        picture, _ = read_image(image, self.pipe.processor, missing="Upload an image to edit, or pick an example.")
        instruction = check_text(instruction, "Instruction")
        if not instruction:
            raise InputError("Enter an instruction, e.g. 'make the circle blue'.")
        steps, guidance, scheduler = self.check_sampling(steps, guidance, scheduler)
        image_guidance = check_number(image_guidance, "Image guidance scale", 0, MAX_GUIDANCE)
        self.check_prompt_length(instruction, "The instruction", around=[{"role": "user", "content": [picture]}])
        call = {"prompt": instruction, "image": picture, "num_inference_steps": steps, "guidance_scale": guidance,
                "image_guidance_scale": image_guidance or None}  # fmt: skip
        settings = f"guidance {guidance:g}, image guidance {f'{image_guidance:g}' if image_guidance else 'off'}"
        yield from self.sample(call, scheduler, self.seed(seed), settings, progress)

    # image → text
    def caption(self, image, prompt="", max_new_tokens=32):
        picture, note = read_image(image, self.pipe.processor)
        prompt = check_text(prompt, "Text prefix")
        max_new_tokens = check_number(max_new_tokens, "Max new tokens", 1, MAX_NEW_TOKENS, integer=True)
        self.check_prompt_length(prompt, "The text prefix")
        with self.pool.borrow() as pipe:
            text = pipe.caption(picture, prompt=prompt or None, max_new_tokens=max_new_tokens)[0]
        return f"{prompt} {text}".strip(), note

    # chat
    def history_messages(self, history: list) -> list[dict]:
        """The Chatbot's history → the conversation's messages, `{"role": "user" | "assistant", "content": [text and
        images]}`: the user's text and uploads, the assistant's text and the images this Space drew (gradio hands
        both back as files in its upload folder). An image that is gone or unreadable is left out, and so is a message
        left empty; an image from anywhere else is refused."""
        messages = []
        for message in history:
            if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
                continue
            content = message.get("content")
            parts = []
            for part in content if isinstance(content, list) else [content]:
                if isinstance(part, dict) and part.get("type") == "text":
                    part = part.get("text")
                if isinstance(part, str):
                    parts += [part.strip()] if part.strip() and part != EMPTY_REPLY else []
                elif isinstance(part, dict) and (part.get("type") == "file" or "path" in part):
                    try:
                        parts.append(read_image(part.get("file", part), self.pipe.processor)[0])
                    except NotUploadedError:
                        raise  # a history may only hold images this server received or made
                    except gr.Error:
                        pass  # an earlier image that is gone or unreadable is left out of the context
            if parts:
                messages.append({"role": message["role"], "content": parts})
        return messages

    def fit_conversation(self, messages: list[dict], budget: int) -> list[dict]:
        """The latest turns of `messages` (which end with the new user turn) that the processor lays out in `budget`
        positions, starting at a user turn: the oldest turns are dropped first. Empty when even the new turn does not
        fit."""
        starts = [i for i, message in enumerate(messages) if message["role"] == "user"]
        # fewer turns never take more positions: the first start that fits, by bisection
        k = bisect.bisect_left(starts, True, key=lambda start: self.count_positions(messages[start:]) <= budget)
        return messages[starts[k]:] if k < len(starts) else []

    def chat(
        self,
        message,
        history=None,
        max_new_tokens=48,
        max_images=1,
        steps=None,
        guidance=3.0,
        temperature=0.0,
        seed=0,
        progress=gr.Progress(),
    ):
        """The assistant's next turn: the history and the new message as a conversation (oldest turns dropped when it
        does not fit), answered with the model's text and images."""
        history = [] if history is None else history
        steps = self.default_steps if steps is None else steps
        message = message if isinstance(message, dict) else {"text": message, "files": []}
        text = check_text(message.get("text"), "Message")
        files = list(message.get("files") or [])
        if not text and not files:
            raise InputError("Type a message or attach an image.")
        max_new_tokens = check_number(max_new_tokens, "Max new tokens", 1, MAX_NEW_TOKENS, integer=True)
        max_images = check_number(max_images, "Images per reply", 0, MAX_CHAT_IMAGES, integer=True)
        steps = check_number(steps, "Steps", 1, MAX_STEPS, integer=True)
        guidance = check_number(guidance, "Guidance scale", 0, MAX_GUIDANCE)
        temperature = check_number(temperature, "Temperature", 0, MAX_TEMPERATURE)
        seed = self.seed(seed)
        if not isinstance(history, list):
            raise InputError("The chat history must be a list of messages.")
        pictures = [read_image(f, self.pipe.processor)[0] for f in files]
        turn = {"role": "user", "content": [*pictures, *([text] if text else [])]}  # images first, as in an edit
        budget = self.config.max_position_embeddings - max_new_tokens - max_images * self.image_cost
        # a message takes at least two positions (its role and some content): older ones can never fit
        recent = history[len(history) - max(budget, 0) // 2 :]
        messages = self.fit_conversation([*self.history_messages(recent), turn], budget)
        if not messages:
            raise InputError(
                f"The message does not fit in this model's {self.config.max_position_embeddings} positions with "
                f"{max_new_tokens} new tokens and {max_images} images; shorten it or lower those settings."
            )

        user = {"role": "user", "content": [*({"path": upload_path(f)} for f in files), *([text] if text else [])]}
        history = [*history, user]
        yield [*history, {"role": "assistant", "content": "…"}], None

        def run(pipe, callback):
            pipe.scheduler = self.make_scheduler(self.default_scheduler)
            return pipe.chat(
                messages,
                max_new_tokens=max_new_tokens,
                max_images=max_images,
                num_inference_steps=steps,
                guidance_scale=guidance,
                temperature=temperature,
                generator=torch.Generator().manual_seed(seed),
                callback_on_step_end=callback,  # previews and cancellation
            ).message["content"]

        progress(0, desc="Writing")
        image_number = 0
        for event in stream_run(self.pool, run, preview_every=max(1, steps // 4)):
            if event[0] == "step":
                _, i, total, previews = event
                image_number += i == 1
                progress((i, total), desc=f"Drawing image {image_number}", unit="steps")
                if previews is not None:
                    preview = {"path": self.save_image(previews[0])}
                    draft = [f"Drawing image {image_number}… step {i}/{total}", preview]
                    yield [*history, {"role": "assistant", "content": draft}], None
            else:
                reply = [
                    part.strip() if isinstance(part, str) else {"path": self.save_image(part)}
                    for part in event[1]
                    if not isinstance(part, str) or part.strip()
                ]
        yield [*history, {"role": "assistant", "content": reply or EMPTY_REPLY}], None


def edit_examples() -> list[list[str]]:
    """[source image, instruction] of the example edits shipped in examples/ (edits.json); none without them."""
    index = EXAMPLES_DIR / "edits.json"
    if not index.is_file():
        return []
    examples = [(EXAMPLES_DIR / e["image"], e["instruction"]) for e in json.loads(index.read_text())]
    return [[str(image), instruction] for image, instruction in examples if image.is_file()]


# the sampling settings the tabs share
def steps_input(space: TransfusionSpace) -> gr.Slider:
    return gr.Slider(1, MAX_STEPS, value=space.default_steps, step=1, precision=0, label="Steps")


def guidance_input(label: str = "Guidance scale", value: float = 3.0) -> gr.Slider:
    return gr.Slider(0, MAX_GUIDANCE, value=value, step=0.1, label=label)


def scheduler_input(space: TransfusionSpace) -> gr.Dropdown:
    return gr.Dropdown(list(space.schedulers), value=space.default_scheduler, label="Scheduler")


def seed_input() -> gr.Number:
    return gr.Number(0, label="Seed (-1: random)", precision=0, minimum=-1, maximum=MAX_SEED)


def build_demo(pipe, concurrency: int = 2, model_name: str | None = None) -> gr.Blocks:
    """The Blocks app around a loaded pipeline, queued with `concurrency` model calls at a time."""
    space = TransfusionSpace(pipe, concurrency)
    c = space.config
    params = sum(p.numel() for p in pipe.transformer.parameters()) / 1e6
    model_name = model_name or pipe.config.get("_name_or_path") or "a Transfusion model"
    limits = {"concurrency_limit": concurrency, "concurrency_id": "model", "preprocess": False}

    with gr.Blocks(title="Transfusion", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "# Transfusion\nOne transformer that writes text token by token and draws images by diffusion. "
            f"Model: `{model_name}` · {params:.1f}M parameters · {c.image_size}×{c.image_size} images · "
            f"{pipe.device.type}"
        )
        with gr.Tab("Text → image"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="Prompt", placeholder="a red circle", elem_id="prompt")
                    negative = gr.Textbox("", label="Negative prompt", placeholder="optional",
                                          elem_id="negative-prompt")
                    with gr.Row():
                        steps, guidance = steps_input(space), guidance_input()
                    with gr.Row():
                        scheduler = scheduler_input(space)
                        num_images = gr.Slider(1, MAX_IMAGES, value=4, step=1, precision=0, label="Number of images")
                    seed = seed_input()
                    with gr.Row():
                        generate_btn = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                        stop_btn = gr.Button("Stop", variant="stop")
                with gr.Column():
                    gallery = gr.Gallery(
                        label="Images", columns=4, height=360, object_fit="contain", format="png", elem_id="gallery"
                    )
                    status = gr.Markdown(label="Status", elem_id="generate-status")
            gr.Examples([[e] for e in EXAMPLES], inputs=[prompt], label="Example prompts")
            generating = gr.on(
                [generate_btn.click, prompt.submit],
                space.generate,
                inputs=[prompt, negative, steps, guidance, seed, scheduler, num_images],
                outputs=[gallery, status],
                api_name="generate",
                show_progress_on=[status],
                **limits,
            )
            stop_btn.click(None, cancels=[generating], api_visibility="private")

        with gr.Tab("Edit"):
            with gr.Row():
                with gr.Column():
                    edit_image = gr.Image(
                        label="Image to edit (any size or mode)",
                        type="filepath",
                        sources=["upload", "clipboard"],
                        height=320,
                        elem_id="edit-image",
                    )
                    instruction = gr.Textbox(label="Instruction", placeholder="make the circle blue",
                                             elem_id="instruction")  # fmt: skip
                    with gr.Row():
                        edit_steps, edit_guidance = steps_input(space), guidance_input()
                        image_guidance = guidance_input("Image guidance scale (0: off)", value=0.0)
                    with gr.Row():
                        edit_scheduler, edit_seed = scheduler_input(space), seed_input()
                    with gr.Row():
                        edit_btn = gr.Button("Edit", variant="primary", elem_id="edit-btn")
                        edit_stop = gr.Button("Stop", variant="stop")
                with gr.Column():
                    edited = gr.Gallery(
                        label="Edited image", columns=2, height=360, object_fit="contain", format="png",
                        elem_id="edited",
                    )
                    edit_status = gr.Markdown(label="Status", elem_id="edit-status")
            examples = edit_examples()
            if examples:
                gr.Examples(examples, inputs=[edit_image, instruction], label="Example edits", elem_id="edit-examples")
            editing = gr.on(
                [edit_btn.click, instruction.submit],
                space.edit,
                inputs=[edit_image, instruction, edit_steps, edit_guidance, image_guidance, edit_seed, edit_scheduler],
                outputs=[edited, edit_status],
                api_name="edit",
                show_progress_on=[edit_status],
                **limits,
            )
            edit_stop.click(None, cancels=[editing], api_visibility="private")

        with gr.Tab("Image → text"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(
                        label="Image (any size or mode)",
                        type="filepath",
                        sources=["upload", "clipboard"],
                        height=320,
                        elem_id="caption-image",
                    )
                    prefix = gr.Textbox("", label="Text prefix (optional)", placeholder="a photo of a")
                    caption_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=32, step=1, precision=0, label="Max new tokens")
                    caption_btn = gr.Button("Caption", variant="primary", elem_id="caption-btn")
                with gr.Column():
                    caption_out = gr.Textbox(label="Caption", lines=2, interactive=False, elem_id="caption-output")
                    caption_note = gr.Markdown(label="Image note", elem_id="caption-status")
            gr.on(
                [caption_btn.click, image.upload],
                space.caption,
                inputs=[image, prefix, caption_tokens],
                outputs=[caption_out, caption_note],
                api_name="caption",
                **limits,
            )

        with gr.Tab("Chat"):
            chatbot = gr.Chatbot(label="Conversation", height=440, elem_id="chatbot")
            chat_input = gr.MultimodalTextbox(
                label="Message",
                placeholder="Ask for a picture ('a red circle') or attach one and ask about it",
                file_types=["image"],
                file_count="multiple",
                sources=["upload"],
                show_label=False,
                elem_id="chat-input",
            )
            with gr.Accordion("Settings", open=False):
                with gr.Row():
                    chat_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=48, step=1, precision=0, label="Max new tokens")
                    chat_images = gr.Slider(0, MAX_CHAT_IMAGES, value=1, step=1, precision=0, label="Images per reply")
                    chat_temperature = gr.Slider(0, MAX_TEMPERATURE, value=0, step=0.05, label="Temperature")
                with gr.Row():
                    chat_steps, chat_guidance, chat_seed = steps_input(space), guidance_input(), seed_input()
            chat_settings = [chat_tokens, chat_images, chat_steps, chat_guidance, chat_temperature, chat_seed]
            gr.Examples([[{"text": e, "files": []}] for e in EXAMPLES[2:]], inputs=[chat_input], label="Try")
            chat_input.submit(
                space.chat,
                inputs=[chat_input, chatbot, *chat_settings],
                outputs=[chatbot, chat_input],
                api_name="chat",
                show_progress="minimal",
                show_progress_on=[chatbot],
                **limits,
            )
    demo.queue(default_concurrency_limit=concurrency, max_size=64)
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, **kwargs):
    """Serve `demo` with the upload size limit and the page style."""
    return demo.launch(
        server_name=host, server_port=port, max_file_size=f"{MAX_UPLOAD_MB}mb", css=CSS, show_error=True, **kwargs
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default=None,
        help="pipeline folder, model folder or Hub id (default: $TRANSFUSION_MODEL, else the first of "
        + ", ".join(str(folder) for folder in DEFAULT_MODELS) + " there is)",
    )
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), help="address to bind")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--concurrency", type=int, default=2, help="model calls served at a time")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args(argv)
    if args.concurrency < 1:
        parser.error(f"--concurrency must be ≥ 1, got {args.concurrency}")
    if args.threads:
        torch.set_num_threads(args.threads)
    name = resolve_model(args.model)
    pipe = load_pipeline(name, device=args.device)
    shown = os.path.relpath(name, ROOT) if Path(name).resolve().is_relative_to(ROOT) else name
    print(f"Loaded {name}; serving on http://{args.host}:{args.port}", flush=True)
    launch(build_demo(pipe, args.concurrency, model_name=shown), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
