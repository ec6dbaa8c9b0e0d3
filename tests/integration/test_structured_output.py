"""Structured output (response_format / ChatRequest.response_format) end to
end on both transports, and the OpenAI-compatibility fixes of issue #13
item 5, against real server processes (tiny model, random weights)."""

from __future__ import annotations

import http.client
import json
from typing import Annotated, Literal

import grpc
import jsonschema
import openai
import pytest
from harness import ServerProcess, running_server
from pydantic import BaseModel, ConfigDict, Field

from qwen_grpc_client.pb.qwen import qwen_service_pb2 as pb

HELLO = [{"role": "user", "content": "Fill in the form."}]


class Form(BaseModel):
    """Bounded everywhere (no extra keys either), so a sampled answer closes
    well within max_tokens."""

    model_config = ConfigDict(extra="forbid")

    answer: Literal["yes", "no", "maybe"]
    confidence: int = Field(ge=0, le=100)
    ok: bool
    tags: list[Annotated[str, Field(max_length=6)]] = Field(max_length=3)
    note: str = Field(max_length=12)


FORM_SCHEMA = Form.model_json_schema()


def sdk(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0)


def raw(server: ServerProcess, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection(server.host, server.http_port, timeout=30)
    try:
        conn.request(
            method, path, body=body, headers=headers if headers is not None else {"Content-Type": "application/json"}
        )
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def chat_body(**fields) -> bytes:
    return json.dumps({"messages": HELLO, "max_tokens": 4, **fields}).encode()


# ------------------------------------------------------- structured output


def test_sdk_parse_with_a_pydantic_model_at_temperature_1(server):
    client = sdk(server)
    answers = set()
    for seed in range(8):
        completion = client.chat.completions.parse(
            model="", messages=HELLO, response_format=Form, temperature=1.0, seed=seed, max_tokens=200
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, Form)
        answers.add(choice.message.content)
    assert len(answers) > 4  # sampled, not one forced text


def test_json_schema_over_a_stream_and_over_grpc(server, stub):
    stream = sdk(server).chat.completions.create(
        model="",
        messages=HELLO,
        temperature=1.0,
        seed=3,
        max_tokens=200,
        stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "form", "schema": FORM_SCHEMA}},
    )
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks)), FORM_SCHEMA)
    response_format = pb.ResponseFormat(type=pb.ResponseFormat.TYPE_JSON_SCHEMA, json_schema=json.dumps(FORM_SCHEMA))
    for seed in range(4):
        request = pb.ChatRequest(
            messages=[pb.Message(**m) for m in HELLO],
            temperature=1.0,
            seed=seed,
            max_tokens=200,
            response_format=response_format,
        )
        reply = stub.Chat(request, timeout=60)
        assert reply.finish_reason == pb.FINISH_REASON_STOP, reply.content
        jsonschema.validate(json.loads(reply.content), FORM_SCHEMA)


def test_the_python_sdk_constrains_to_a_schema_or_to_json(server):
    """QwenClient's json_schema= (a pydantic model, a dict or JSON text) and
    json_mode=: sampled answers at temperature 1 are always valid."""
    from qwen_grpc_client import QwenClient, build_request

    assert not build_request(HELLO).HasField("response_format")  # old behaviour unless asked
    assert build_request(HELLO, json_mode=True).response_format.type == pb.ResponseFormat.TYPE_JSON_OBJECT
    with QwenClient(server.target, timeout=60) as client:
        for seed, schema in enumerate([Form, FORM_SCHEMA, json.dumps(FORM_SCHEMA)]):
            answer = client.chat(HELLO, json_schema=schema, temperature=1.0, seed=seed, max_tokens=200)
            assert answer.finish_reason == "stop", answer.content
            jsonschema.validate(json.loads(answer.content), FORM_SCHEMA)
        pieces = list(client.stream(HELLO, json_mode=True, temperature=1.0, seed=7, max_tokens=200))
        assert pieces[-1].finish_reason == pb.FINISH_REASON_STOP
        assert isinstance(json.loads("".join(piece.content for piece in pieces)), dict)
        with pytest.raises(grpc.RpcError) as refused:
            client.chat(HELLO, json_schema={"type": "no-such-type"})
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details().startswith("response_format")


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_schema", "json_schema": {"name": "f", "schema": {"type": "no-such-type"}}},
        {"type": "json_schema", "json_schema": {"name": "f", "schema": {"$ref": "#/$defs/missing"}}},
    ],
)
def test_invalid_schema_is_400_naming_response_format(server, response_format):
    with pytest.raises(openai.BadRequestError) as error:
        sdk(server).chat.completions.create(model="", messages=HELLO, max_tokens=4, response_format=response_format)
    assert error.value.body["param"] == "response_format"


@pytest.mark.parametrize("schema", ['{"type": "no-such-type"}', '{"type": "object"', "[]"])
def test_invalid_schema_is_invalid_argument_over_grpc(stub, schema):
    request = pb.ChatRequest(
        messages=[pb.Message(**m) for m in HELLO],
        max_tokens=4,
        response_format=pb.ResponseFormat(type=pb.ResponseFormat.TYPE_JSON_SCHEMA, json_schema=schema),
    )
    for call in (lambda: stub.Chat(request, timeout=10), lambda: list(stub.ChatStream(request, timeout=10))):
        with pytest.raises(grpc.RpcError) as error:
            call()
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details().startswith("response_format:")


# ------------------------------------------------------ item 5: the fixes


def test_seeds_outside_int64_are_400(server):
    client = sdk(server)
    for seed in (2**64 + 42, 2**63, -(2**63) - 1):
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model="", messages=HELLO, max_tokens=4, temperature=1.0, seed=seed)
        assert error.value.body["param"] == "seed"
    assert client.chat.completions.create(model="", messages=HELLO, max_tokens=4, temperature=1.0, seed=2**63 - 1)


def test_null_optional_fields_are_accepted(server):
    status, _, payload = raw(
        server, "POST", "/v1/chat/completions", chat_body(stream=None, stream_options=None, seed=None)
    )
    assert status == 200, payload
    assert json.loads(payload)["object"] == "chat.completion"


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Type": "text/plain"},
        {"Content-Type": "application/x-www-form-urlencoded"},
        {"Content-Type": "multipart/form-data; boundary=x"},
        {},
    ],
)
def test_bodies_that_are_not_declared_json_are_415(server, headers):
    status, _, payload = raw(server, "POST", "/v1/chat/completions", chat_body(), headers)
    assert status == 415
    assert json.loads(payload)["error"]["code"] == "unsupported_media_type"
    ok, _, _ = raw(
        server, "POST", "/v1/chat/completions", chat_body(), {"Content-Type": "application/json; charset=utf-8"}
    )
    assert ok == 200


def test_no_cors_unless_configured(server, tiny_model_dir):
    preflight = {
        "Origin": "https://app.example.com",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    status, headers, _ = raw(server, "OPTIONS", "/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in headers and status >= 400
    with running_server(tiny_model_dir, "--cors-allowed-origins", "https://app.example.com", "--threads", "1") as cors:
        status, headers, _ = raw(cors, "OPTIONS", "/v1/chat/completions", headers=preflight)
        assert status == 200 and headers["access-control-allow-origin"] == "https://app.example.com"
        status, headers, _ = raw(
            cors, "OPTIONS", "/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"}
        )
        assert "access-control-allow-origin" not in headers
        status, headers, _ = raw(
            cors,
            "POST",
            "/v1/chat/completions",
            chat_body(),
            {"Content-Type": "application/json", "Origin": "https://app.example.com"},
        )
        assert status == 200 and headers["access-control-allow-origin"] == "https://app.example.com"
        assert "x-request-id" in headers["access-control-expose-headers"]


def test_a_stream_ending_on_length_sends_the_finish_reason_with_an_empty_delta(server):
    status, _, payload = raw(
        server, "POST", "/v1/chat/completions", chat_body(stream=True, max_tokens=6, temperature=0)
    )
    assert status == 200
    chunks = [json.loads(e.removeprefix("data: ")) for e in payload.decode().split("\n\n")[:-2]]
    final = chunks[-1]["choices"][0]
    assert final["finish_reason"] == "length" and final["delta"] == {}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_a_prompt_over_the_context_window_is_context_length_exceeded(server):
    with pytest.raises(openai.BadRequestError) as error:
        sdk(server).chat.completions.create(
            model="", messages=[{"role": "user", "content": "lorem ipsum " * 3000}], max_tokens=4
        )
    assert error.value.body["code"] == "context_length_exceeded"
    assert error.value.body["param"] == "messages"


def test_x_request_id_echoes_the_clients_or_is_the_completion_id(server):
    for stream in (False, True):
        status, headers, payload = raw(server, "POST", "/v1/chat/completions", chat_body(stream=stream))
        assert status == 200
        first = json.loads(payload.decode().split("\n\n")[0].removeprefix("data: ") if stream else payload)
        assert headers["x-request-id"] == first["id"] and first["id"].startswith("chatcmpl-")
        mine = {"Content-Type": "application/json", "X-Request-Id": "trace-42"}
        status, headers, _ = raw(server, "POST", "/v1/chat/completions", chat_body(stream=stream), mine)
        assert status == 200 and headers["x-request-id"] == "trace-42"
    status, headers, _ = raw(server, "POST", "/v1/chat/completions", chat_body(max_tokens=0), mine)
    assert status == 400 and headers["x-request-id"] == "trace-42"
