"""The playground in a real browser: Playwright for Python driving Debian's chromium (Playwright's own browser
download does not work on these machines; .ci/run installs the package when it is missing).

Also the way docs/playground.png is made, from a trained model:
    .venv/bin/python tests/test_serve_browser.py --model_path runs/demo/best_model.pt --out docs/playground.png
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script too

from tests.test_serve import NAME, Server, call, metric, save_tiny_checkpoint  # noqa: E402


def chromium() -> str | None:
    """Debian's browser binary (/usr/bin/chromium is a shell wrapper around it)."""
    for path in ("/usr/lib/chromium/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if path and Path(path).is_file():
            return path
    return None


def launch(playwright):
    return playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def set_value(page, selector: str, value) -> None:
    """Sliders and fields the way a user changes them: the value, then an input event."""
    page.eval_on_selector(
        selector,
        "(el, v) => { el.value = v; el.dispatchEvent(new Event('input', {bubbles: true})); }",
        str(value),
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if chromium() is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium; .ci/run does it)")
    folder = tmp_path_factory.mktemp("browser")
    s = Server(save_tiny_checkpoint(folder), folder / "server.log", "--served_model_name", NAME)
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def browser(server):
    with sync_playwright() as p:
        browser = launch(p)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(server, browser):
    page = browser.new_page(viewport={"width": 1200, "height": 800})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    expect(page.locator("#model-name")).to_have_text(NAME)
    yield page
    page.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def test_stream_then_stop_shows_speed_and_cancels_on_the_server(server, page, tmp_path):
    assert "d_model 32" in page.inner_text("#arch") and "context 1024" in page.inner_text("#arch")
    set_value(page, "#max_tokens", 1000)
    set_value(page, "#temperature", 0)
    page.fill("#prompt", "ROMEO:")
    page.press("#prompt", "Control+Enter")
    # text streams in: the generated part grows while the request runs
    expect(page.locator("#output .generated")).not_to_be_empty()
    wait_until(lambda: page.inner_text("#tokens").isdigit() and int(page.inner_text("#tokens")) >= 20)
    assert page.inner_text("#status") == "streaming\u2026"
    assert metric(server, "hilt_requests_running") == 1
    page.click("#stop")
    expect(page.locator("#status")).to_have_text("stopped")
    stopped_at = page.inner_text("#output .generated")
    time.sleep(0.5)
    assert page.inner_text("#output .generated") == stopped_at  # the stream has ended
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
    wait_until(lambda: metric(server, "hilt_requests_running") == 0, 2.0)  # Stop aborted the fetch: cancelled
    tokens = int(page.inner_text("#tokens"))
    assert 20 <= tokens < 1000
    assert float(page.inner_text("#tps")) > 0
    assert re.fullmatch(r"\d+ ms", page.inner_text("#ttft"))
    page.screenshot(path=str(tmp_path / "playground.png"))
    assert (tmp_path / "playground.png").read_bytes()[:4] == b"\x89PNG"


def test_a_finished_completion_shows_exact_counts(page):
    set_value(page, "#max_tokens", 7)
    page.fill("#prompt", "To be")
    page.click("#send")
    expect(page.locator("#status")).to_have_text("done (max tokens)")
    assert page.inner_text("#tokens") == "7" and page.inner_text("#prompt-tokens") == "2"
    assert page.inner_text("#output .prompt-echo") == "To be"


def test_chat_mode_and_a_refusal_shown_as_the_servers_message(page):
    page.click("#mode-chat")
    set_value(page, "#max_tokens", 5)
    page.fill("#prompt", "Hello there")
    page.keyboard.press("Control+Enter")
    expect(page.locator("#status")).to_have_text(re.compile("^done"))
    assert page.locator(".msg.user .text").all_inner_texts() == ["Hello there"]
    assert len(page.locator(".msg.assistant").all()) == 1
    assert page.is_hidden("#error")
    # a request the server refuses: the page shows the server's own message, and the turn is dropped
    set_value(page, "#max_tokens", 1024)
    page.fill("#prompt", "And now a long answer")
    page.keyboard.press("Control+Enter")
    page.wait_for_selector("#error:not([hidden])")
    assert "400" in page.inner_text("#error") and "context" in page.inner_text("#error")
    assert len(page.locator(".msg.user").all()) == 1
    assert page.input_value("#prompt") == "And now a long answer"  # given back to edit


def sent_bodies(page) -> list[dict]:
    """The JSON bodies the page posts from now on, as the server receives them."""
    bodies = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.method == "POST" else None)
    return bodies


def test_stop_strings_one_per_line_any_text_and_an_error_past_four(server, page):
    page.click("#mode-completion")
    set_value(page, "#max_tokens", 40)
    set_value(page, "#temperature", 0)
    page.fill("#prompt", "To be, or not")
    # a comma is a stop string of its own line; \n writes a newline
    page.fill("#stops", ",\n\\n\\n\nsee you")
    with page.expect_request(lambda r: r.url.endswith("/v1/completions")) as sent:
        page.click("#send")
    body = sent.value.post_data_json
    assert body["stop"] == [",", "\n\n", "see you"]
    expect(page.locator("#status")).to_have_text(re.compile("^done"))
    # the page shows what the server generates with exactly those stop strings
    plain = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    expected = call(server, "POST", "/v1/completions", plain)[2]["choices"][0]["text"]
    assert page.eval_on_selector("#output .generated", "el => el.textContent") == expected
    # five lines: an error naming the limit, nothing sent, nothing cut
    shown = page.eval_on_selector("#output", "el => el.textContent")
    bodies = sent_bodies(page)
    page.fill("#stops", "a\nb\nc\nd\ne")
    page.click("#send")
    expect(page.locator("#error")).to_contain_text("at most 4")
    assert "there are 5" in page.inner_text("#error") and page.inner_text("#status") == "not sent"
    time.sleep(0.3)
    assert bodies == [] and page.eval_on_selector("#output", "el => el.textContent") == shown
    page.fill("#stops", "")


def test_chat_sends_the_system_prompt_first(server, page):
    page.click("#mode-completion")
    assert page.is_hidden("#system")  # a completion has no system prompt
    page.click("#clear")
    page.click("#mode-chat")
    page.fill("#system", "You are terse.")
    set_value(page, "#max_tokens", 4)
    page.fill("#prompt", "Hello there")
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as sent:
        page.click("#send")
    assert sent.value.post_data_json["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello there"},
    ]
    expect(page.locator("#status")).to_have_text(re.compile("^done"))
    # the server rendered it into the prompt: its token count is the whole transcript's
    rendered = "<BOS>System: You are terse.\nUser: Hello there\nAssistant:"
    assert int(page.inner_text("#prompt-tokens")) == len(
        call(server, "POST", "/tokenize", {"text": rendered})[2]["tokens"]
    )
    # the next turn sends it first again, before the conversation so far
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as sent:
        page.fill("#prompt", "Again")
        page.click("#send")
    roles = [m["role"] for m in sent.value.post_data_json["messages"]]
    assert roles == ["system", "user", "assistant", "user"]
    expect(page.locator("#status")).to_have_text(re.compile("^done"))
    page.fill("#system", "")


def test_a_refused_completion_shows_the_error_not_the_prompt(page):
    page.click("#mode-completion")
    set_value(page, "#max_tokens", 1024)
    page.fill("#prompt", "Thou art a villain")
    page.click("#send")
    expect(page.locator("#status")).to_have_text("refused")
    output = page.eval_on_selector("#output", "el => el.textContent")
    assert "Thou art" not in output and "context" in output and "400" in output
    assert page.locator("#output .prompt-echo").count() == 0
    assert page.input_value("#prompt") == "Thou art a villain"  # still there to edit


def test_readable_on_a_phone(server, browser):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.goto(server.url + "/")
    expect(page.locator("#model-name")).to_have_text(NAME)
    # one column, nothing wider than the screen, the controls within reach
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    for selector in ("#prompt", "#send", "#stop", "#max_tokens", "#temperature"):
        box = page.locator(selector).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390, selector
    context.close()


# --- docs/playground.png --------------------------------------------------------------------------------------


def screenshot(model_path: str, out: str, prompt: str, max_tokens: int) -> None:
    """A finished completion from a trained model, as the README shows it."""
    folder = Path(out).resolve().parent
    s = Server(model_path, Path("/tmp/hilt-screenshot-server.log"))
    try:
        with sync_playwright() as p:
            browser = launch(p)
            page = browser.new_page(viewport={"width": 1180, "height": 760}, device_scale_factor=1)
            page.goto(s.url + "/")
            expect(page.locator("#arch")).not_to_be_empty()
            set_value(page, "#max_tokens", max_tokens)
            set_value(page, "#temperature", 0.8)
            set_value(page, "#seed", 7)
            page.fill("#prompt", prompt)
            page.click("#send")
            expect(page.locator("#status")).to_have_text(re.compile("^done"), timeout=120_000)
            folder.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=out, full_page=True)
            browser.close()
    finally:
        s.stop()
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", required=True)
    parser.add_argument("--out", default="docs/playground.png")
    parser.add_argument(
        "--prompt", default="ROMEO:\nO, she doth teach the torches to burn bright!\n\nJULIET:\n"
    )
    parser.add_argument("--max_tokens", type=int, default=120)
    args = parser.parse_args()
    screenshot(args.model_path, args.out, args.prompt, args.max_tokens)
