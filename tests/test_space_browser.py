"""The Space in a real browser (Debian's chromium driven by Playwright): type a prompt and generate, upload an image
and read its caption, chat with an image in the reply, and see the message for an empty prompt. The app is served
in-process (`build_demo` + `launch`); screenshots go to the test's tmp dir."""

import socket
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from test_space import drawing_pipeline, load_app

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
