"""The Space (space/app.py) served as a subprocess and called through gradio_client: every named endpoint, outputs
equal to direct pipeline calls, bad inputs answered with clear messages while the server keeps serving, concurrent
requests, a missing checkpoint, and the Space layout (app.py beside its checkpoint and examples, no repository
packages). In-process, what the handlers hand the pipeline: an edit's image and instruction, the chat's conversation
(user and assistant turns with their images, the oldest dropped when it does not fit)."""

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import ROOT, outside_repo_env, tiny_model
from diffusers import DDIMScheduler
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from pipelines import TransfusionPipeline

APP = ROOT / "space" / "app.py"
SERVER_START_SECONDS = 90


def load_app():
    """space/app.py as a module (it is a script in a folder, not a package)."""
    spec = importlib.util.spec_from_file_location("space_app", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def drawing_pipeline(tokenizer) -> TransfusionPipeline:
    """A tiny random pipeline whose text head prefers `<|boi|>`, then one word: its chat replies hold an image and its
    captions are not empty (a random head almost never opens an image)."""
    model = tiny_model()
    c = model.config
    word = tokenizer("circle", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] += 50.0  # every text position gets a large positive first feature…
        model.lm_head.weight.zero_()  # …which is all the head reads: <|boi|> first, the word once boi is used up
        model.lm_head.weight[c.boi_token_id, 0] = 1.0
        model.lm_head.weight[word, 0] = 0.5
    scheduler = DDIMScheduler.from_config(model.config.scheduler_config())
    pipe = TransfusionPipeline(transformer=model, scheduler=scheduler, tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", NO_PROXY="127.0.0.1,localhost")
    env.pop("TRANSFUSION_MODEL", None)
    return env


@contextmanager
def serve(model_dir: Path, log_path: Path):
    """`python space/app.py --model model_dir` on a free 127.0.0.1 port; yields its URL once it answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    command = [sys.executable, str(APP), "--model", str(model_dir), "--port", str(port), "--threads", "1"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=app_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + SERVER_START_SECONDS
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the app exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "config", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the app did not answer in {SERVER_START_SECONDS} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def pipe(tokenizer):
    return drawing_pipeline(tokenizer)


@pytest.fixture(scope="module")
def model_dir(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("space-model") / "transfusion-tiny"
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def client(model_dir, tmp_path_factory):
    with serve(model_dir, tmp_path_factory.mktemp("space-log") / "app.log") as url:
        yield Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("space-downloads")))


def pixels(path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path).convert("RGB"), dtype=np.int16)


GOOD_GENERATE = ("a red circle", "", 3, 3.0, 0, "DDIM", 1)


def test_named_endpoints(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/generate", "/edit", "/caption", "/chat"} <= set(endpoints)


@pytest.mark.parametrize("scheduler", ["DDIM", "DPM-Solver++", "DPM-Solver++ SDE", "DDPM", "Euler"])
def test_generate_equals_the_pipeline(client, model_dir, scheduler):
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    gallery, status = client.predict("a red circle", "a blue square", 4, 2.5, 7, scheduler, 2, api_name="/generate")
    assert len(gallery) == 2 and "seed 7" in status and scheduler in status
    classes = {
        "DDIM": (DDIMScheduler, {}),
        "DPM-Solver++": (DPMSolverMultistepScheduler, {}),
        "DPM-Solver++ SDE": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),  # draws noise
        "DDPM": (DDPMScheduler, {}),
        "Euler": (EulerDiscreteScheduler, {}),
    }
    cls, overrides = classes[scheduler]
    reference = TransfusionPipeline.from_pretrained(model_dir)  # the scheduler swap starts from the saved config
    reference.scheduler = cls.from_config(reference.scheduler.config, **overrides)
    reference.set_progress_bar_config(disable=True)
    expected = reference(
        "a red circle",
        negative_prompt="a blue square",
        num_inference_steps=4,
        guidance_scale=2.5,
        num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(7),
    ).images
    for item, image in zip(gallery, expected):
        got = pixels(item["image"])
        assert got.shape == (32, 32, 3)
        assert np.abs(got - np.asarray(image, dtype=np.int16)).max() <= 1


def test_caption_equals_the_pipeline(client, pipe, tmp_path):
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    image.save(tmp_path / "in.png")
    caption, note = client.predict(handle_file(str(tmp_path / "in.png")), "", 6, api_name="/caption")
    assert caption == pipe.caption(image, max_new_tokens=6)[0] and caption
    assert note == "32×32 RGB, used as is"
    prefixed, _ = client.predict(handle_file(str(tmp_path / "in.png")), "a photo of", 6, api_name="/caption")
    assert prefixed.startswith("a photo of ")


@pytest.mark.parametrize(
    "mode, size, note",
    [
        ("RGBA", (64, 40), "64×40 RGBA → 32×32 RGB (transparency on black, padded to a square)"),
        ("I;16", (100, 100), "100×100 I;16 → 32×32 RGB (values rescaled to 8 bits)"),
        ("L", (28, 28), "28×28 L → 32×32 RGB"),
        ("P", (300, 200), "300×200 P → 32×32 RGB (padded to a square)"),
    ],
)
def test_caption_converts_any_mode_and_size(client, tmp_path, mode, size, note):
    rng = np.random.default_rng(1)
    if mode == "I;16":
        image = PIL.Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16))
    else:
        channels = 4 if mode == "RGBA" else 3
        image = PIL.Image.fromarray(rng.integers(0, 256, (*size[::-1], channels), dtype=np.uint8)).convert(mode)
    image.save(tmp_path / "in.png")
    caption, got = client.predict(handle_file(str(tmp_path / "in.png")), "", 4, api_name="/caption")
    assert got == note and isinstance(caption, str)


def test_chat_replies_with_images_over_several_turns(client, tmp_path):
    settings = {"max_new_tokens": 6, "max_images": 1, "steps": 3, "guidance": 3.0, "temperature": 0, "seed": 0}
    history, cleared = client.predict({"text": "a red circle", "files": []}, [], *settings.values(), api_name="/chat")
    assert [m["role"] for m in history] == ["user", "assistant"] and cleared["text"] == ""
    reply = history[-1]["content"]
    assert reply[0]["type"] == "file" and pixels(reply[0]["file"]).shape == (32, 32, 3)
    assert reply[1]["type"] == "text" and reply[1]["text"] == "c" * 5  # the drawing head's word, after the image

    # the client hands back downloaded paths: images go back to the server wrapped in handle_file
    for message in history:
        for part in message["content"]:
            if part["type"] == "file":
                part["file"] = handle_file(part["file"])
    PIL.Image.new("RGB", (40, 40), "red").save(tmp_path / "red.png")
    message = {"text": "what is this?", "files": [handle_file(str(tmp_path / "red.png"))]}
    history, _ = client.predict(message, history, *settings.values(), api_name="/chat")
    assert [m["role"] for m in history] == ["user", "assistant"] * 2
    assert [part["type"] for part in history[2]["content"]] == ["file", "text"]


@pytest.mark.parametrize("image_guidance, note", [(0, "image guidance off"), (1.5, "image guidance 1.5")])
def test_edit_equals_the_pipeline(client, model_dir, tmp_path, image_guidance, note):
    source = PIL.Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    source.save(tmp_path / "source.png")
    file = handle_file(str(tmp_path / "source.png"))
    gallery, status = client.predict(file, "make the circle blue", 3, 2.5, image_guidance, 7, "DDIM", api_name="/edit")
    assert len(gallery) == 1 and note in status and "seed 7" in status
    reference = TransfusionPipeline.from_pretrained(model_dir)
    reference.set_progress_bar_config(disable=True)
    expected = reference(
        "make the circle blue",
        image=source,
        num_inference_steps=3,
        guidance_scale=2.5,
        image_guidance_scale=image_guidance or None,
        generator=torch.Generator().manual_seed(7),
    ).images[0]
    assert np.abs(pixels(gallery[0]["image"]) - np.asarray(expected, dtype=np.int16)).max() <= 1


# -- the handlers in-process: what the Space hands the pipeline ------------------------------------------------------
@pytest.fixture(scope="module")
def app():
    return load_app()


@pytest.fixture()
def space(app, pipe, tmp_path, monkeypatch):
    """The Space's handlers around `pipe`, with gradio's upload folder in tmp_path."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    return app.TransfusionSpace(pipe, 1)


@pytest.fixture()
def calls(monkeypatch):
    """(args, kwargs) of every `pipe(...)` and `pipe.generate_interleaved(...)` call, by method name."""
    recorded = {"__call__": [], "generate_interleaved": []}
    for name in recorded:

        def spy(self, *args, _original=getattr(TransfusionPipeline, name), _calls=recorded[name], **kwargs):
            _calls.append((args, kwargs))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(TransfusionPipeline, name, spy)
    return recorded


def no_progress(*args, **kwargs):
    pass


def last(outputs):
    """The final output of a streaming handler."""
    *_, final = outputs
    return final


def upload(folder: Path, name: str, image: PIL.Image.Image) -> dict:
    """An image in gradio's upload folder, as a request hands it to a handler."""
    image.save(folder / name)
    return {"path": str(folder / name), "meta": {"_type": "gradio.FileData"}}


def colours(content: list) -> list:
    """A message's content with each image shown as its top-left pixel."""
    return [part if isinstance(part, str) else np.asarray(part)[0, 0].tolist() for part in content]


def test_edit_hands_the_pipeline_the_image_and_the_instruction(space, calls, tmp_path):
    source = PIL.Image.new("RGBA", (64, 40), (255, 0, 0, 255))
    file = upload(tmp_path, "source.png", source)
    images, status = last(space.edit(file, "  make the  square blue ", 2, 2.5, 0, 5, "DDIM", progress=no_progress))
    ((args, kwargs),) = calls["__call__"]
    assert kwargs["prompt"] == "make the square blue" and kwargs["image_guidance_scale"] is None
    assert kwargs["num_inference_steps"] == 2 and kwargs["guidance_scale"] == 2.5
    expected = space.pipe.processor.prepare_image(source)[0]  # padded to a square, 32×32 RGB
    np.testing.assert_array_equal(np.asarray(kwargs["image"]), np.asarray(expected))
    assert len(images) == 1 and images[0].size == (32, 32)
    assert "DDIM, 2 steps, guidance 2.5, image guidance off, seed 5" in status
    last(space.edit(file, "make the square blue", 2, 2.5, 1.5, 5, "DDIM", progress=no_progress))
    assert calls["__call__"][-1][1]["image_guidance_scale"] == 1.5


def test_chat_hands_the_pipeline_the_conversation(space, calls, pipe, tmp_path):
    red = upload(tmp_path, "red.png", PIL.Image.new("RGB", (32, 32), "red"))
    drawn = upload(tmp_path, "drawn.png", PIL.Image.new("RGB", (32, 32), "blue"))  # a reply's image, handed back
    green = upload(tmp_path, "green.png", PIL.Image.new("RGB", (32, 32), "green"))
    history = [
        {"role": "user", "content": [{"type": "file", "file": red}, {"type": "text", "text": "what is this?"}]},
        {"role": "assistant", "content": "a red square"},
        {"role": "user", "content": [{"type": "text", "text": "draw a blue one"}]},
        {"role": "assistant", "content": [{"type": "file", "file": drawn}, {"type": "text", "text": "here it is"}]},
    ]
    message = {"text": "make it green", "files": [green]}
    shown, _ = last(space.chat(message, history, 4, 1, 2, 2.5, 0, 3, progress=no_progress))
    ((args, kwargs),) = calls["generate_interleaved"]
    messages = args[0]
    assert [(m["role"], colours(m["content"])) for m in messages] == [
        ("user", [[255, 0, 0], "what is this?"]),
        ("assistant", ["a red square"]),
        ("user", ["draw a blue one"]),
        ("assistant", [[0, 0, 255], "here it is"]),
        ("user", [[0, 128, 0], "make it green"]),  # the new turn: its images, then its text
    ]
    settings = {"max_new_tokens": 4, "max_images": 1, "num_inference_steps": 2, "guidance_scale": 2.5, "temperature": 0}
    assert settings.items() <= kwargs.items()
    # the reply shown is pipe.chat's answer to that conversation
    assert shown[:-1] == [*history, {"role": "user", "content": [{"path": green["path"]}, "make it green"]}]
    expected = pipe.chat(messages, max_new_tokens=4, max_images=1, num_inference_steps=2, guidance_scale=2.5,
                         generator=torch.Generator().manual_seed(3)).message["content"]  # fmt: skip
    reply = shown[-1]["content"]
    assert len(reply) == len(expected) and any(not isinstance(part, str) for part in expected)
    for got, want in zip(reply, expected):
        if isinstance(want, str):
            assert got == want.strip()
        else:
            assert np.abs(pixels(got["path"]) - np.asarray(want, dtype=np.int16)).max() <= 1


def test_chat_drops_the_oldest_turns_that_do_not_fit(space, calls, tmp_path):
    picture = upload(tmp_path, "picture.png", PIL.Image.new("RGB", (32, 32), "red"))
    history = []
    for i in range(12):  # about 30 positions a pair: more than the tiny model's 256
        history += [
            {"role": "user", "content": [{"type": "file", "file": picture}, {"type": "text", "text": f"picture {i}"}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"a red square {i}"}]},
        ]
    last(space.chat({"text": "and now?", "files": []}, history, 4, 1, 2, 3.0, 0, 0, progress=no_progress))
    messages = calls["generate_interleaved"][0][0][0]
    everything = [*space.history_messages(history), {"role": "user", "content": ["and now?"]}]
    start = len(everything) - len(messages)
    assert start > 0 and messages == everything[start:] and messages[0]["role"] == "user"
    budget = space.config.max_position_embeddings - 4 - space.image_cost  # the reply's new tokens and image
    assert space.count_positions(messages) <= budget < space.count_positions(everything[start - 2 :])


def test_history_leaves_out_gone_images_and_the_empty_reply_note(app, space, tmp_path):
    gone = upload(tmp_path, "gone.png", PIL.Image.new("RGB", (8, 8)))
    Path(gone["path"]).unlink()
    history = [
        {"role": "user", "content": [{"type": "file", "file": gone}, {"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": app.EMPTY_REPLY},
        {"role": "assistant", "content": [{"type": "file", "file": gone}]},
        "not a message",
    ]
    assert space.history_messages(history) == [{"role": "user", "content": ["hi"]}]


@pytest.mark.parametrize(
    "args, message",
    [
        (("", "", 3, 3.0, 0, "DDIM", 1), "Enter a prompt"),
        (("   ", "", 3, 3.0, 0, "DDIM", 1), "Enter a prompt"),
        (("a red circle", "", 0, 3.0, 0, "DDIM", 1), "Steps must be from 1 to 250, got 0"),
        (("a red circle", "", 251, 3.0, 0, "DDIM", 1), "Steps must be from 1 to 250, got 251"),
        (("a red circle", "", 2.5, 3.0, 0, "DDIM", 1), "Steps must be a whole number from 1 to 250, got 2.5"),
        (("a red circle", "", 3, -0.5, 0, "DDIM", 1), "Guidance scale must be from 0 to 20, got -0.5"),
        (("a red circle", "", 3, 20.5, 0, "DDIM", 1), "Guidance scale must be from 0 to 20, got 20.5"),
        (("a red circle", "", 3, 3.0, 0, "DDIM", 9), "Number of images must be from 1 to 8, got 9"),
        (("a red circle", "", 3, 3.0, 0, "LMS", 1),
         "Scheduler must be one of DDIM, DPM-Solver\\+\\+, DPM-Solver\\+\\+ SDE, DDPM, Euler"),
        (("a red circle", "", 3, 3.0, -2, "DDIM", 1), "Seed must be from -1 to"),
        (("circle " * 400, "", 3, 3.0, 0, "DDIM", 1), "The prompt is \\d+ tokens long; this model takes at most"),
    ],
)
def test_bad_generate_inputs_are_clear_errors(client, args, message):
    with pytest.raises(AppError, match=message):
        client.predict(*args, api_name="/generate")


def write_bad_upload(kind: str, path: Path) -> Path:
    if kind == "corrupt":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(2000))
    elif kind == "not an image":
        path.write_text("hello, I am text")
    elif kind == "truncated":
        PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:3000])
    elif kind == "too wide":
        PIL.Image.new("L", (5000, 8)).save(path)  # a few hundred bytes, 5000 px wide
    return path


@pytest.mark.parametrize(
    "kind, message",
    [
        ("corrupt", "Could not read the upload as an image"),
        ("not an image", "Could not read the upload as an image"),
        ("truncated", "Could not read the upload as an image"),
        ("too wide", "The image is 5000×8 px; the limit is 4096 px per side"),
    ],
)
def test_bad_uploads_are_clear_errors(client, tmp_path, kind, message):
    path = write_bad_upload(kind, tmp_path / "upload.png")
    with pytest.raises(AppError, match=message):
        client.predict(handle_file(str(path)), "", 4, api_name="/caption")
    with pytest.raises(AppError, match=message):
        client.predict({"text": "hi", "files": [handle_file(str(path))]}, [], 4, 1, 2, 3.0, 0, 0, api_name="/chat")


def test_upload_over_20_mb_is_refused(client, tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(os.urandom(21 * 2**20))
    with pytest.raises(Exception, match="(?i)size|large|413"):
        client.predict(handle_file(str(path)), "", 4, api_name="/caption")


@pytest.mark.parametrize(
    "message, settings, error",
    [
        ({"text": "  ", "files": []}, (4, 1, 2, 3.0, 0, 0), "Type a message or attach an image"),
        ({"text": "hi", "files": []}, (0, 1, 2, 3.0, 0, 0), "Max new tokens must be from 1 to 256, got 0"),
        ({"text": "hi", "files": []}, (4, 5, 2, 3.0, 0, 0), "Images per reply must be from 0 to 4, got 5"),
        ({"text": "hi", "files": []}, (4, 1, 2, 3.0, 2.5, 0), "Temperature must be from 0 to 2, got 2.5"),
        ({"text": "hi", "files": []}, (4, 1, 300, 3.0, 0, 0), "Steps must be from 1 to 250, got 300"),
        ({"text": "circle " * 400, "files": []}, (4, 1, 2, 3.0, 0, 0), "The message does not fit"),
    ],
)
def test_bad_chat_inputs_are_clear_errors(client, message, settings, error):
    with pytest.raises(AppError, match=error):
        client.predict(message, [], *settings, api_name="/chat")


def test_server_still_serves_after_bad_inputs(client):
    with pytest.raises(AppError):
        client.predict("", "", 3, 3.0, 0, "DDIM", 1, api_name="/generate")
    gallery, status = client.predict(*GOOD_GENERATE, api_name="/generate")
    assert len(gallery) == 1 and "seed 0" in status


def test_twenty_concurrent_requests(client, tmp_path):
    PIL.Image.new("RGB", (32, 32), "blue").save(tmp_path / "blue.png")

    def request(i: int):
        if i % 2:
            return client.predict(handle_file(str(tmp_path / "blue.png")), "", 4, api_name="/caption")
        return client.predict(f"a red circle {i}", "", 2, 3.0, i, "DDIM", 1, api_name="/generate")

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(request, range(20), timeout=120))
    assert all(isinstance(r[0], str) for r in results[1::2])
    assert all(len(r[0]) == 1 and f"seed {i}" in r[1] for i, r in zip(range(0, 20, 2), results[::2]))


def test_missing_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    app = load_app()
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(SystemExit, match=f"(?s)No Transfusion checkpoint at {missing}.*training.train"):
        app.main(["--model", str(missing)])
    monkeypatch.setenv("TRANSFUSION_MODEL", str(missing))
    with pytest.raises(SystemExit, match=f"No Transfusion checkpoint at {missing}"):
        app.load_pipeline()


@pytest.mark.parametrize(
    "cls, overrides, expected",
    [
        ("DDIMScheduler", {}, "DDIM"),
        ("DPMSolverMultistepScheduler", {}, "DPM-Solver++"),
        ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "DPM-Solver++ SDE"),
    ],
)
def test_default_scheduler_is_the_checkpoints_own_variant(pipe, cls, overrides, expected):
    import diffusers

    sampler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **overrides)
    own = TransfusionPipeline(transformer=pipe.transformer, scheduler=sampler, tokenizer=pipe.tokenizer)
    assert load_app().TransfusionSpace(own, 1).default_scheduler == expected


def test_a_bare_model_folder_loads_as_a_pipeline(pipe, tmp_path):
    """The folder training writes (model + tokenizer, no model_index.json) is served with DDIM sampling."""
    pipe.transformer.save_pretrained(tmp_path)
    pipe.tokenizer.save_pretrained(tmp_path)
    loaded = load_app().load_pipeline(tmp_path)
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    ids = torch.tensor([[0, 10, 11]])
    torch.testing.assert_close(loaded.transformer(input_ids=ids).logits, pipe.transformer(input_ids=ids).logits)


@pytest.mark.parametrize("bundled", [("transfusion-tiny",), ("transfusion-tiny", "transfusion-tiny-instruct")],
                         ids=["base", "base+instruct"])
def test_space_layout_loads_the_checkpoint_beside_app(model_dir, tmp_path, bundled):
    """As a Space: app.py at the root, the checkpoint in checkpoints/ beside it (the instruction-tuned one when it is
    there), no repository packages."""
    shutil.copy(APP, tmp_path / "app.py")
    shutil.copytree(APP.parent / "examples", tmp_path / "examples")
    for name in bundled:
        shutil.copytree(model_dir, tmp_path / "checkpoints" / name)
    script = (
        "import importlib.util, app\n"
        "assert importlib.util.find_spec('pipelines') is None\n"
        "pipe = app.load_pipeline()\n"
        "demo = app.build_demo(pipe, 1)\n"
        "assert len(app.edit_examples()) == 4, app.edit_examples()\n"
        "print('SPACE-OK', type(pipe).__name__, app.resolve_model())\n"
    )
    env = outside_repo_env(tmp_path, {**app_env(), "HOME": str(tmp_path)})
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "SPACE-OK TransfusionPipeline" in res.stdout, res.stderr[-3000:]
    assert res.stdout.strip().endswith(str(tmp_path / "checkpoints" / bundled[-1])), res.stdout
