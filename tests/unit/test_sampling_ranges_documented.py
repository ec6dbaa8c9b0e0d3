"""The sampling ranges are written once (service/engine/types.py); the
proto's comments, the README's API table and the web page's fields state the same numbers."""

from __future__ import annotations

import pathlib

from service.engine.types import (
    LOGIT_BIAS_LIMIT,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_N,
    MAX_STOP_BYTES,
    MAX_STOP_SEQUENCES,
    MAX_TOP_LOGPROBS,
    PENALTY_LIMIT,
    REPETITION_PENALTY_MAX,
    TEMPERATURE_MAX,
)

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_proto_comments_state_the_ranges():
    proto = (REPO / "proto" / "qwen" / "qwen_service.proto").read_text()
    for phrase in (
        f"Sampling temperature in [0, {TEMPERATURE_MAX:g}]",
        f"Choices to generate, 1..{MAX_N}",
        f"the 0..{MAX_TOP_LOGPROBS} most likely alternatives",
        f"each in [{-PENALTY_LIMIT:g}, {PENALTY_LIMIT:g}]",
        f"bias in [{-LOGIT_BIAS_LIMIT:g}, {LOGIT_BIAS_LIMIT:g}]",
        f"At most {MAX_LOGIT_BIAS_ENTRIES} entries",
        f"At most {MAX_STOP_SEQUENCES}, each at most {MAX_STOP_BYTES} bytes",
    ):
        assert phrase in proto, phrase


def test_readme_api_table_states_the_ranges():
    readme = (REPO / "README.md").read_text()
    for phrase in (
        f"| 0…{TEMPERATURE_MAX:g}; **0 is greedy** |",
        f"| (0, {REPETITION_PENALTY_MAX:g}]; 1 disables |",
        f"≤ {MAX_STOP_SEQUENCES} strings of 1–{MAX_STOP_BYTES} bytes",
        f"| 1 | 1…{MAX_N} and ≤ `--max-batch-size`",
        f"(and 0…{MAX_TOP_LOGPROBS} alternatives)",
        f"| 0 | −{PENALTY_LIMIT:g}…{PENALTY_LIMIT:g}, OpenAI's",
        f"bias in −{LOGIT_BIAS_LIMIT:g}…{LOGIT_BIAS_LIMIT:g} added to its logit; ≤ {MAX_LOGIT_BIAS_ENTRIES} ids",
    ):
        assert phrase in readme, phrase


def test_web_page_temperature_field_allows_the_same_range():
    page = (REPO / "service" / "api" / "static" / "index.html").read_text()
    assert f'id="temperature" type="number" min="0" max="{TEMPERATURE_MAX:g}"' in page
