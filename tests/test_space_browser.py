"""The Space in a real browser (Debian's chromium driven by Playwright): type a prompt and generate, upload an image
and read its caption, chat with an image in the reply and go on to a second turn, pick an example image and an
instruction and see the edited image, and see the messages for an empty prompt and a missing image to edit. The app is
served in-process (`build_demo` + `launch`); screenshots go to the test's tmp dir."""

import socket
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from test_space import drawing_pipeline, load_app

from pipelines import TransfusionPipeline

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def pipe(tokenizer):
    return drawing_pipeline(tokenizer)


@pytest.fixture(scope="module")
def url(pipe):
    if not CHROMIUM.exists():
        pytest.skip(f"needs Debian chromium at {CHROMIUM}: run scripts/install_system_deps.sh --browser")
    app = load_app()
    demo = app.build_demo(pipe, concurrency=2, model_name="tiny random test model")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app.launch(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def context(url, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1280, "height": 900},
        )
        context.set_default_timeout(TIMEOUT_MS)
        yield context
        context.close()


@pytest.fixture()
def page(context, url):
    page = context.new_page()
    page.goto(url)
    page.locator("#prompt textarea").wait_for()
    yield page
    page.close()


def test_generate_shows_images(page, tmp_path):
    from playwright.sync_api import expect

    page.locator("#prompt textarea").fill("a red circle")
    page.locator("#generate-btn").click()
    expect(page.locator("#generate-status")).to_contain_text("seed 0")
    expect(page.locator("#gallery img")).to_have_count(4)  # the default number of images
    page.wait_for_function("() => [...document.querySelectorAll('#gallery img')].every(i => i.naturalWidth === 32)")
    page.screenshot(path=tmp_path / "generate.png", full_page=True)
    assert (tmp_path / "generate.png").stat().st_size > 10_000


def test_empty_prompt_gets_a_message(page):
    from playwright.sync_api import expect

    page.locator("#generate-btn").click()
    expect(page.get_by_text("Enter a prompt, e.g. 'a red circle'.")).to_be_visible()
    page.locator("#prompt textarea").fill("two blue triangles")  # and the app still answers
    page.locator("#generate-btn").click()
    expect(page.locator("#generate-status")).to_contain_text("seed 0")


def test_upload_shows_caption(page, pipe, tmp_path):
    from playwright.sync_api import expect

    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    image.save(tmp_path / "upload.png")
    page.get_by_role("tab", name="Image → text").click()
    page.locator("#caption-image input[type=file]").set_input_files(tmp_path / "upload.png")  # upload → caption
    expected = pipe.caption(image, max_new_tokens=32)[0]
    expect(page.locator("#caption-output textarea")).to_have_value(expected)
    expect(page.locator("#caption-status")).to_contain_text("32×32 RGB, used as is")
    page.screenshot(path=tmp_path / "caption.png", full_page=True)


def test_chat_reply_shows_an_image(page, tmp_path):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Chat").click()
    page.locator("#chat-input textarea").fill("a red circle")
    page.locator("#chat-input textarea").press("Enter")
    expect(page.locator("#chatbot img")).to_have_count(1)
    expect(page.locator("#chatbot")).to_contain_text("a red circle")
    page.wait_for_function("() => document.querySelector('#chatbot img').naturalWidth > 0")  # loaded, not broken
    page.screenshot(path=tmp_path / "chat.png", full_page=True)


def test_chat_second_turn_reads_the_first(page, tmp_path, monkeypatch):
    """The history the browser sends back (the first reply's image included, from gradio's folder) is read: the
    second turn hands the model both turns."""
    from playwright.sync_api import expect

    prompts = []
    original = TransfusionPipeline.generate_interleaved

    def spy(self, prompt, *args, **kwargs):
        prompts.append(prompt)
        return original(self, prompt, *args, **kwargs)

    monkeypatch.setattr(TransfusionPipeline, "generate_interleaved", spy)
    page.get_by_role("tab", name="Chat").click()
    for turn, text in enumerate(("a red circle", "now make it blue"), start=1):
        page.locator("#chat-input textarea").fill(text)
        page.locator("#chat-input textarea").press("Enter")
        expect(page.locator("#chatbot img")).to_have_count(turn)  # a preview, then the reply's image
        expect(page.locator("#chatbot")).not_to_contain_text("Drawing image")  # the reply is done
        expect(page.locator("#chatbot")).to_contain_text(text)
    page.screenshot(path=tmp_path / "chat-two-turns.png", full_page=True)
    first, second = prompts
    assert [m["role"] for m in second] == ["user", "assistant", "user"] and second[0] == first[0]
    assert [isinstance(part, str) for part in second[1]["content"]] == [False, True]  # the first reply: image, text
    assert second[2]["content"] == ["now make it blue"]


def test_edit_an_example_shows_the_edited_image(page, tmp_path):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Edit").click()
    page.locator("#edit-btn").click()  # nothing to edit yet
    expect(page.get_by_text("Upload an image to edit, or pick an example.")).to_be_visible()
    page.locator("#edit-examples [data-testid='dataset-cell-1-0']").click()  # the second example's image
    expect(page.locator("#edit-image img")).to_have_count(1)
    expect(page.locator("#instruction textarea")).to_have_value("put the yellow triangle above the red square")
    page.locator("#instruction textarea").fill("make the square blue")
    page.locator("#edit-btn").click()
    expect(page.locator("#edit-status")).to_contain_text("image guidance off, seed 0")
    expect(page.locator("#edited img")).to_have_count(1)
    page.wait_for_function("() => document.querySelector('#edited img').naturalWidth === 32")  # loaded, not broken
    page.screenshot(path=tmp_path / "edit.png", full_page=True)
