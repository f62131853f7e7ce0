"""The demo in a real browser: Debian's headless Chromium driven by Playwright.

What `adaspkv demo` does with no arguments, in one test: the default artifact is searched (2 trials),
`vllm serve ART_DIR --plugin adaspkv` serves it, the Gradio app runs on a free port; the browser
asks without an image (a message), uploads a ShapesVQA test image and asks for a caption (the
answer must arrive in pieces: streamed), picks the example count question (the answer must be
right), then the vLLM server is stopped and a question must give the "not answering" message while
the page keeps working. Screenshots go to tmp_path and runs/browser-test/.

Playwright's own browser download cannot work on this project's machines, so the test uses the
system Chromium (`executable_path`); without it the test fails (CI must prove the demo).
"""

from __future__ import annotations

import shutil
import time
from contextlib import ExitStack

import pytest

from demo.app import CHAT_ID, IMAGE_ID, QUESTION_ID, SEND_ID, STATS_ID, STATUS_ID, AppConfig, launch
from demo.launch import DemoConfig, resolve_artifact, serving, shapes_examples
from offline_search.data import shapes_vqa
from offline_search.data.bundled_models import resolve_model
from offline_search.evaluation.vllm_server import free_port
from tests.conftest import REPO

INSTALL_HINT = ("Debian's Chromium is needed for the browser test: `apt-get install -y chromium` "
                "(scripts/setup_venv.sh installs it when run as root), or put a `chromium` on PATH")
TIMEOUT_MS = 60_000
COUNT_SAMPLE = 2  # ShapesVQA test sample 2: "How many shapes are there?" -> three (the first example)


def chromium_executable() -> str:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    pytest.fail(INSTALL_HINT)


def bot_texts(page) -> list[str]:
    return page.eval_on_selector_all(f"#{CHAT_ID} [data-testid=bot]", "nodes => nodes.map(n => n.innerText.trim())")


def ask(page, question: str, answer_number: int) -> str:
    """Types `question`, clicks Ask, waits for the speed line of answer `answer_number`."""
    page.fill(f"#{QUESTION_ID} textarea", question)
    page.click(f"#{SEND_ID}")
    page.wait_for_function(f"document.querySelector('#{STATS_ID}').innerText.includes('Answer {answer_number},')",
                           timeout=TIMEOUT_MS)
    return bot_texts(page)[-1]


def record_bot_texts(page) -> None:
    """Keeps every text the last answer bubble shows, to see an answer arrive in pieces."""
    page.evaluate(f"""() => {{
        window.seenAnswers = [];
        new MutationObserver(() => {{
            const bots = document.querySelectorAll('#{CHAT_ID} [data-testid=bot]');
            if (bots.length) window.seenAnswers.push(bots[bots.length - 1].innerText.trim());
        }}).observe(document.querySelector('#{CHAT_ID}'), {{subtree: true, childList: true, characterData: true}});
    }}""")


def screenshot(page, tmp_path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    kept = REPO / "runs" / "browser-test" / path.name
    kept.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, kept)
    print(f"screenshot: {kept}")


def test_without_chromium_the_test_fails_and_says_how_to_install(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(pytest.fail.Exception, match=r"apt-get install -y chromium"):
        chromium_executable()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*")  # pandas 3 on Gradio's queue
def test_image_chat_in_a_real_browser(tmp_path, vllm_env, monkeypatch):
    chromium = chromium_executable()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the Python package `playwright` is missing: .venv/bin/pip install playwright "
                    "(scripts/setup_venv.sh installs it); no browser download is needed")
    monkeypatch.setenv("VLLM_CACHE_ROOT", vllm_env["VLLM_CACHE_ROOT"])
    monkeypatch.setenv("ADASPKV_CACHE_DIR", str(tmp_path / "adaspkv-cache"))
    config = DemoConfig(workdir=tmp_path / "demo", search_trials=2, kv_cache_memory_bytes=64 << 20,
                        max_tokens=24, startup_timeout_s=300)
    model_dir = resolve_model(config.model)
    started = time.monotonic()
    artifact = resolve_artifact(config, model_dir)  # the first-run search of `adaspkv demo`
    assert (artifact / "adaspkv.json").is_file()
    sample = shapes_vqa.sample("test", COUNT_SAMPLE)
    upload = config.workdir / "upload.png"
    upload.parent.mkdir(parents=True, exist_ok=True)
    sample.image.save(upload)
    with ExitStack() as servers, ExitStack() as app_stack:
        main, _ = servers.enter_context(serving(config, model_dir, artifact))
        print(f"artifact searched and server up after {time.monotonic() - started:.0f} s")
        examples = tuple(shapes_examples(config.workdir))
        assert examples[0].question == sample.question
        app, url = launch(AppConfig(compressed=main, artifact=artifact, max_tokens=config.max_tokens,
                                    examples=examples), "127.0.0.1", free_port(),
                          allowed_paths=(config.workdir.resolve(),))
        app_stack.callback(app.close)
        browser_stack = app_stack.enter_context(sync_playwright())
        browser = browser_stack.chromium.launch(executable_path=chromium, headless=True)
        app_stack.callback(browser.close)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.wait_for_selector(f"#{SEND_ID}")
        assert "KV cache capacity" in page.inner_text("body")  # the profile panel
        assert page.locator(".js-plotly-plot, img, svg").count() > 0

        # no image: a message, no answer
        page.fill(f"#{QUESTION_ID} textarea", sample.question)
        page.click(f"#{SEND_ID}")
        page.wait_for_function(f"document.querySelector('#{STATUS_ID}').innerText.includes('upload an image')")
        assert bot_texts(page) == []

        # an uploaded image and a caption: the answer must arrive in pieces
        page.set_input_files(f"#{IMAGE_ID} input[type=file]", str(upload))
        page.wait_for_selector(f"#{IMAGE_ID} img")
        record_bot_texts(page)
        caption = ask(page, "Describe the image.", 1)
        seen = [t for t in dict.fromkeys(page.evaluate("window.seenAnswers")) if t and t != "…"]
        print(f"caption: {caption!r}; the bubble showed {len(seen)} texts: {seen}")
        assert len(caption.split()) >= 3 and len(seen) >= 2 and caption.startswith(seen[0])
        assert page.inner_text(f"#{STATUS_ID}").strip() == ""

        # the first example (ShapesVQA test image and question): the answer must be right
        page.locator("table tbody tr").first.click()
        page.wait_for_function(f"document.querySelector('#{QUESTION_ID} textarea').value.includes('How many')")
        answer = page.locator(f"#{QUESTION_ID} textarea").input_value()
        assert answer == sample.question
        answer = ask(page, sample.question, 2)
        print(f"Q: {sample.question} A: {answer!r} (expected {sample.answer})")
        assert shapes_vqa.is_correct(answer, sample.answer)
        assert "tokens/s" in page.inner_text(f"#{STATS_ID}")
        screenshot(page, tmp_path, "demo-answered")

        # the server is gone: a message, and the page keeps working
        servers.close()
        page.fill(f"#{QUESTION_ID} textarea", "Is it still there?")
        page.click(f"#{SEND_ID}")
        page.wait_for_function(f"document.querySelector('#{STATUS_ID}').innerText.includes('is not answering')")
        assert f"The vLLM server at {main.url} is not answering" in page.inner_text(f"#{STATUS_ID}")
        screenshot(page, tmp_path, "demo-server-gone")
        page.get_by_role("button", name="Clear chat").click()
        page.wait_for_function(f"document.querySelectorAll('#{CHAT_ID} [data-testid=bot]').length === 0")
    print(f"browser test took {time.monotonic() - started:.0f} s")
