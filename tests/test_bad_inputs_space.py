"""The Space's API from outside: files it never received are not read (no server file can be captioned or edited, no
answer tells whether a path exists, a FIFO blocks nothing), bad edits get messages naming the field, optional inputs are
optional, outputs are named, integers are integers, handled input errors log one line. After every bad request a normal
one still succeeds."""

import os
import time

import numpy as np
import PIL.Image
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from test_space import drawing_pipeline, serve

NOT_UPLOADED = "image file was not uploaded to this server"


@pytest.fixture(scope="module")
def server(tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("space-model") / "transfusion-tiny"
    drawing_pipeline(tokenizer).save_pretrained(folder)
    log = tmp_path_factory.mktemp("space-log") / "app.log"
    with serve(folder, log) as url:
        yield Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads"))), log


@pytest.fixture()
def client(server):
    return server[0]


@pytest.fixture()
def picture(tmp_path):
    path = tmp_path / "picture.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


def still_serves(client, picture):
    caption, note = client.predict(handle_file(str(picture)), "", 3, api_name="/caption")
    assert isinstance(caption, str) and note == "32×32 RGB, used as is"


def raw_file(path) -> dict:
    """A file given by its server path, without gradio's `meta` marker: gradio's own upload check never sees it."""
    return {"path": str(path)}


def test_a_server_file_that_was_not_uploaded_is_never_read(client, picture, tmp_path):
    secret = tmp_path / "secret.png"  # a PNG on the server, outside gradio's upload folder
    PIL.Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8)).save(secret)
    answers = []
    for path in (secret, tmp_path / "missing.png", "/etc/passwd"):
        with pytest.raises(AppError) as info:
            client.predict(raw_file(path), "", 3, api_name="/caption")
        answers.append(str(info.value))
        still_serves(client, picture)
    assert all(NOT_UPLOADED in a for a in answers), answers
    assert len(set(answers)) == 1  # an existing and a missing path get the same answer: no oracle


def test_edit_never_reads_a_server_file(client, picture, tmp_path):
    secret = tmp_path / "secret.png"
    PIL.Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8)).save(secret)
    answers = []
    for path in (secret, tmp_path / "missing.png", "/etc/passwd"):
        with pytest.raises(AppError) as info:
            client.predict(raw_file(path), "make it blue", 2, api_name="/edit")
        answers.append(str(info.value))
    assert all(NOT_UPLOADED in a for a in answers) and len(set(answers)) == 1, answers
    still_serves(client, picture)


GOOD_EDIT = ("make the circle blue", 2, 3.0, 0, 0, "DDIM")


@pytest.mark.parametrize(
    "image, args, message",
    [
        (False, GOOD_EDIT, "Upload an image to edit, or pick an example"),
        (True, ("", *GOOD_EDIT[1:]), "Enter an instruction, e.g. 'make the circle blue'"),
        (True, ("   ", *GOOD_EDIT[1:]), "Enter an instruction"),
        (True, (42, *GOOD_EDIT[1:]), "Instruction must be text, got int"),
        (True, ("circle " * 400, *GOOD_EDIT[1:]), "The instruction is \\d+ tokens long; this model takes at most \\d+"),
        (True, ("make it blue", 0, 3.0, 0, 0, "DDIM"), "Steps must be from 1 to 250, got 0"),
        (True, ("make it blue", 2.5, 3.0, 0, 0, "DDIM"), "Steps must be a whole number from 1 to 250, got 2.5"),
        (True, ("make it blue", 2, 21, 0, 0, "DDIM"), "Guidance scale must be from 0 to 20, got 21"),
        (True, ("make it blue", 2, 3.0, -1, 0, "DDIM"), "Image guidance scale must be from 0 to 20, got -1"),
        (True, ("make it blue", 2, 3.0, "lots", 0, "DDIM"), "Image guidance scale must be a number from 0 to 20"),
        (True, ("make it blue", 2, 3.0, 0, -2, "DDIM"), "Seed must be from -1 to"),
        (True, ("make it blue", 2, 3.0, 0, 0, "LMS"), "Scheduler must be one of DDIM"),
    ],
)
def test_bad_edit_inputs_name_the_field(client, picture, image, args, message):
    with pytest.raises(AppError, match=message):
        client.predict(handle_file(str(picture)) if image else None, *args, api_name="/edit")
    still_serves(client, picture)


def test_a_corrupt_image_to_edit_is_a_clear_error(client, picture, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(2000))
    with pytest.raises(AppError, match="Could not read the upload as an image"):
        client.predict(handle_file(str(broken)), *GOOD_EDIT, api_name="/edit")
    images, status = client.predict(handle_file(str(picture)), *GOOD_EDIT, api_name="/edit")
    assert len(images) == 1 and "image guidance off" in status


def test_a_fifo_path_returns_at_once_and_blocks_no_worker(client, picture, tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    start = time.monotonic()
    with pytest.raises(AppError, match=NOT_UPLOADED):
        client.predict(raw_file(fifo), "", 3, api_name="/caption")
    assert time.monotonic() - start < 30
    still_serves(client, picture)


def test_chat_cannot_smuggle_a_server_file(client, picture, tmp_path):
    secret = tmp_path / "secret.png"
    PIL.Image.fromarray(np.full((32, 32, 3), 90, dtype=np.uint8)).save(secret)
    settings = (4, 0, 2, 3.0, 0.0, 0)
    # (an attachment given as a bare path is refused by gradio's own MultimodalData validation)
    with pytest.raises(AppError, match="meta"):
        client.predict({"text": "what is this?", "files": [str(secret)]}, [], *settings, api_name="/chat")
    still_serves(client, picture)
    # an image in the history
    history = [{"role": "user", "content": [{"type": "file", "file": {"path": str(secret)}}]},
               {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]  # fmt: skip
    with pytest.raises(AppError, match="meta"):  # refused by gradio's ChatbotDataMessages validation
        client.predict({"text": "what is this?", "files": []}, history, *settings, api_name="/chat")
    still_serves(client, picture)


def test_history_images_must_be_uploads(tokenizer, tmp_path, monkeypatch):
    """Behind gradio's validation, the app's own rule holds too: a history image outside the upload folder is refused
    (not silently left out), one that was uploaded but is gone is left out. The images the Space draws reach a later
    turn only through gradio's folder too: its own copy is not read."""
    import test_space

    app = test_space.load_app()
    secret = tmp_path / "secret.png"
    PIL.Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(secret)
    with pytest.raises(app.NotUploadedError, match=NOT_UPLOADED):
        app.upload_path({"path": str(secret)})
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(app.NotUploadedError):
        app.upload_path({"path": str(tmp_path / "fifo")})

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))
    space = app.TransfusionSpace(drawing_pipeline(tokenizer), 1)
    drawn = space.save_image(PIL.Image.new("RGB", (32, 32), "blue"))
    for path in (str(secret), drawn):
        image = {"type": "file", "file": {"path": path, "meta": {"_type": "gradio.FileData"}}}
        history = [{"role": "user", "content": "draw"}, {"role": "assistant", "content": [image]}]
        with pytest.raises(app.NotUploadedError, match=NOT_UPLOADED):
            next(space.chat({"text": "and now?", "files": []}, history, 4, 0, 2, 3.0, 0, 0, progress=lambda *a: None))


def test_optional_inputs_named_outputs_and_integer_types(client, picture):
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    generate = {p["parameter_name"]: p for p in api["/generate"]["parameters"]}
    assert generate["negative_prompt"]["parameter_has_default"]
    for name in ("steps", "seed", "num_images"):
        assert generate[name]["type"]["type"] == "integer", (name, generate[name]["type"])
    caption = {p["parameter_name"]: p for p in api["/caption"]["parameters"]}
    assert caption["prompt"]["parameter_has_default"] and caption["max_new_tokens"]["type"]["type"] == "integer"
    edit = {p["parameter_name"]: p for p in api["/edit"]["parameters"]}
    assert all(edit[name]["parameter_has_default"] for name in ("steps", "guidance", "image_guidance", "seed"))
    for name in ("steps", "seed"):
        assert edit[name]["type"]["type"] == "integer", (name, edit[name]["type"])
    for endpoint in ("/generate", "/edit", "/caption", "/chat"):
        labels = [r["label"] for r in api[endpoint]["returns"]]
        assert all(label and not label.startswith("value_") for label in labels), (endpoint, labels)
    images, status = client.predict("a photo of a dress", api_name="/generate")  # every other input optional
    assert len(images) >= 1 and "steps" in status
    caption_text, _ = client.predict(handle_file(str(picture)), api_name="/caption")
    assert isinstance(caption_text, str)
    edited, status = client.predict(handle_file(str(picture)), "make it blue", api_name="/edit")
    assert len(edited) == 1 and "image guidance off" in status


def test_handled_input_errors_log_one_line_not_a_traceback(server, picture):
    client, log = server
    before = log.read_text()
    with pytest.raises(AppError, match="Steps must be"):
        client.predict("a red circle", "", 0, 3.0, 0, "DDIM", 1, api_name="/generate")
    still_serves(client, picture)
    added = log.read_text()[len(before):]
    assert "Traceback" not in added and "Steps must be" in added, added
