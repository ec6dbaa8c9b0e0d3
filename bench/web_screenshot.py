"""Screenshot of the web chat page answering a real question (for docs/).

    python bench/web_screenshot.py [--url http://127.0.0.1:8000] [--out docs/web-chat.png]

Without --url it starts its own server on the default model (`make model`).
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from browser import ask, browser_page  # noqa: E402
from harness import running_server  # noqa: E402

QUESTION = "Write a Python function that checks whether a string is a palindrome."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server's HTTP base URL")
    parser.add_argument("--out", default=str(ROOT / "docs" / "web-chat.png"))
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--max-tokens", type=int, default=200)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        url = args.url
        if url is None:
            from service.config import default_model_path

            url = stack.enter_context(running_server(default_model_path(), timeout=300)).http_url
        page = stack.enter_context(browser_page(width=1000, height=760))
        page.goto(url + "/")
        page.wait_for_selector("#health.ok", timeout=30_000)
        ask(page, args.question, temperature=0, max_tokens=args.max_tokens)
        page.wait_for_selector(".msg.assistant[data-state=done]", timeout=300_000)
        page.screenshot(path=args.out)
        print(f"wrote {args.out}: {page.inner_text('.msg.assistant .stats')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
