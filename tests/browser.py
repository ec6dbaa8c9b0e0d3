"""Headless Chromium (Debian's package, driven by Playwright) for page tests
and the docs screenshot. `make chromium` installs the browser."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError("no chromium on PATH: run `make chromium` (apt-get install chromium)")


@contextlib.contextmanager
def browser_page(width: int = 1000, height: int = 720) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            yield page
        finally:
            browser.close()


# Installed before the page's own script runs: records every change of the
# newest answer's text with a timestamp, so a test can tell streamed text
# (many growing updates over time) from text that arrived all at once.
TEXT_TIMELINE_JS = """
window.__timeline = [];
new MutationObserver(() => {
  const answers = document.querySelectorAll('.msg.assistant .text');
  if (!answers.length) return;
  const length = answers[answers.length - 1].textContent.length;
  const last = window.__timeline[window.__timeline.length - 1];
  if (!last || last.length !== length) window.__timeline.push({t: performance.now(), length});
}).observe(document, {subtree: true, childList: true, characterData: true});
"""


def ask(page, question: str, *, temperature: float | None = None, max_tokens: int | None = None) -> None:
    """Type a question into the chat page and send it with Enter, as a person would."""
    if temperature is not None:
        page.fill("#temperature", str(temperature))
    if max_tokens is not None:
        page.fill("#max-tokens", str(max_tokens))
    page.click("#prompt")
    page.keyboard.type(question)
    page.keyboard.press("Enter")
