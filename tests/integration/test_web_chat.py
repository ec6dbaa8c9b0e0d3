"""The web chat page in a real headless Chromium: typed question, streamed
answer, stop button, screenshot."""

from __future__ import annotations

import json
import re
import time

import openai
import pytest
from browser import TEXT_TIMELINE_JS, ask, browser_page
from harness import ONE_SLOT_ARGS, running_server

MODEL = "Qwen2.5-0.5B-Instruct"


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with running_server(tiny_model_dir, *ONE_SLOT_ARGS) as srv:
        yield srv


def test_question_streams_into_the_page(server, tmp_path):
    question = "Hello, world! Stream tokens to the edge."
    with browser_page() as page:
        page.add_init_script(TEXT_TIMELINE_JS)
        page.goto(server.http_url + "/")
        page.wait_for_selector("#health.ok", timeout=10_000)
        assert page.locator("#model option").all_inner_texts()[1] == MODEL
        ask(page, question, temperature=0, max_tokens=400)
        page.wait_for_selector(".msg.assistant[data-state=done]", timeout=60_000)
        timeline = page.evaluate("window.__timeline")
        shown = page.inner_text(".msg.assistant .text")
        stats = page.inner_text(".msg.assistant .stats")
        page.screenshot(path=str(tmp_path / "web-chat.png"))
        assert page.inner_text(".msg.user") == question
    # Streamed: the answer grew in several steps spread over time, not at once. The page renders
    # at most once a frame, and the tiny model can send its 400 tokens within a dozen frames.
    lengths = [point["length"] for point in timeline]
    # (Markdown may shorten the shown text by a few characters when a marker closes, e.g. `*a` -> *a*.)
    assert sum(after > before for before, after in zip(lengths, lengths[1:])) >= 5, lengths
    assert timeline[-1]["t"] - timeline[0]["t"] > 50, timeline
    assert "400 tokens" in stats and "finish: length" in stats, stats
    # What the page shows is what the API answers for the same request.
    reference = openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0)
    expected = (
        reference.chat.completions.create(
            model=page_model(server), messages=[{"role": "user", "content": question}], temperature=0, max_tokens=400
        )
        .choices[0]
        .message.content
    )
    if not re.search(r"[`*_#\[\]>~{}<-]|^\s*\d+[.)]", expected, re.M):  # no Markdown, JSON or markup to render
        assert shown == expected
    assert (tmp_path / "web-chat.png").stat().st_size > 10_000


def page_model(server) -> str:
    # The page selects the first served model by default.
    client = openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0)
    return client.models.list().data[0].id


def test_stop_button_aborts_the_generation(server):
    client = openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0)
    with browser_page() as page:
        page.goto(server.http_url + "/")
        page.wait_for_selector("#health.ok", timeout=10_000)
        ask(page, "Tell me everything.", temperature=0.8, max_tokens=20000)
        page.wait_for_selector(".msg.assistant[data-state=streaming]", timeout=30_000)
        # The one slot is busy with the page's answer...
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        page.click("#stop")
        page.wait_for_selector(".msg.assistant[data-state=stopped]", timeout=15_000)
        assert "stopped by you" in page.inner_text(".msg.assistant .stats")
        assert page.is_enabled("#send")
    # ...and is free right after Stop: the browser's abort cancelled it.
    started = time.monotonic()
    while True:
        try:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            break
        except openai.RateLimitError:
            # Freed within one engine step when aborted; held for the ~minute of
            # 20000 tokens otherwise. Generous for a loaded CI machine.
            assert time.monotonic() - started < 10.0, "Stop did not free the slot"
            time.sleep(0.02)


def test_errors_are_shown(server):
    with browser_page() as page:
        page.goto(server.http_url + "/")
        page.wait_for_selector("#health.ok", timeout=10_000)
        ask(page, "hi", temperature=5)
        page.wait_for_selector(".msg.assistant[data-state=error]", timeout=10_000)
        assert "temperature" in page.inner_text(".msg.assistant")


MARKDOWN_ANSWER = """# Plan
Some **bold**, *italic*, `a < b` and a [link](https://example.com/x) and [bad](javascript:alert(1)).

- first item
- second <img src=x onerror="window.__pwned = 1">

1. one
2. two

<script>window.__pwned = 2</script>

```python
print("<b>hi</b>")
```
"""


def sse(*chunks: dict) -> str:
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


def delta(**fields) -> dict:
    finish = fields.pop("finish_reason", None)
    return {
        "id": "x",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": MODEL,
        "choices": [{"index": 0, "delta": fields, "finish_reason": finish}],
    }


def answer_with(page, body: str, question: str = "render") -> None:
    """The page's next answer is `body` (an SSE stream), served by a route instead of the model."""
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body),
    )
    ask(page, question)


def test_markdown_renders_into_elements_and_markup_in_answers_stays_text(server, tmp_path):
    pieces = [MARKDOWN_ANSWER[i : i + 7] for i in range(0, len(MARKDOWN_ANSWER), 7)]  # streamed in small pieces
    body = sse(delta(role="assistant", content=""), *[delta(content=p) for p in pieces], delta(finish_reason="stop"))
    with browser_page() as page:
        page.goto(server.http_url + "/")
        page.wait_for_selector("#health.ok", timeout=10_000)
        answer_with(page, body)
        page.wait_for_selector(".msg.assistant[data-state=done]", timeout=10_000)
        text = page.locator(".msg.assistant .text")
        assert text.locator("h1").inner_text() == "Plan"
        assert text.locator("strong").inner_text() == "bold" and text.locator("em").inner_text() == "italic"
        assert text.locator("p code").first.inner_text() == "a < b"
        link = text.locator("a")
        assert link.count() == 1 and link.get_attribute("href") == "https://example.com/x"
        assert "[bad](javascript:alert(1))" in text.inner_text()
        assert text.locator("ul > li").all_inner_texts() == [
            "first item",
            'second <img src=x onerror="window.__pwned = 1">',
        ]
        assert text.locator("ol > li").all_inner_texts() == ["one", "two"]
        assert text.locator("pre code.language-python").inner_text() == 'print("<b>hi</b>")'
        # Markup in the model's text is shown, never parsed: no element, no script run.
        assert text.locator("img, script, b").count() == 0
        assert "<script>window.__pwned = 2</script>" in text.inner_text()
        assert page.evaluate("window.__pwned") is None
        screenshot = tmp_path / "markdown.png"
        page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000


def test_tool_calls_and_json_answers_are_shown_readably(server):
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    arguments = {"index": 0, "function": {"arguments": '{"city": "Paris", "days": 2}'}}
    tool_stream = sse(
        delta(role="assistant", content=""),
        delta(tool_calls=[call]),
        delta(tool_calls=[arguments]),
        delta(finish_reason="tool_calls"),
    )
    json_stream = sse(
        delta(role="assistant", content=""), delta(content='{"ok": true, "items": [1, 2]}'), delta(finish_reason="stop")
    )
    with browser_page() as page:
        page.goto(server.http_url + "/")
        page.wait_for_selector("#health.ok", timeout=10_000)
        answer_with(page, tool_stream, "weather?")
        page.wait_for_selector(".msg.assistant[data-state=done]", timeout=10_000)
        card = page.locator(".msg.assistant .tool-call")
        assert card.locator(".name").inner_text() == "get_weather"
        assert json.loads(card.locator("pre").inner_text()) == {"city": "Paris", "days": 2}
        assert card.locator("pre").inner_text().count("\n") == 3  # pretty-printed, one key a line
        assert "finish: tool_calls" in page.inner_text(".msg.assistant .stats")
        page.unroute("**/v1/chat/completions")
        answer_with(page, json_stream, "json?")
        page.locator(".msg.assistant[data-state=done]").nth(1).wait_for(timeout=10_000)
        shown = page.locator(".msg.assistant").nth(1).locator(".text pre").inner_text()
        assert shown == json.dumps({"ok": True, "items": [1, 2]}, indent=2)
        # The history the page sends next holds the call as OpenAI wants it back.
        sent = []
        page.unroute("**/v1/chat/completions")
        page.route(
            "**/v1/chat/completions",
            lambda route: (
                sent.append(route.request.post_data_json),
                route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=json_stream),
            ),
        )
        ask(page, "again")
        page.locator(".msg.assistant[data-state=done]").nth(2).wait_for(timeout=10_000)
    assistant = sent[0]["messages"][1]
    assert assistant["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": '{"city": "Paris", "days": 2}',
    }
