"""The wire contract: committed stubs are generated, and clients built on
the original four-field definition interoperate byte for byte."""

from __future__ import annotations

import pathlib
import subprocess
import sys

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from qwen_grpc_client.pb.qwen import qwen_service_pb2 as pb

REPO = pathlib.Path(__file__).resolve().parents[2]

LEGACY_PROTO = """
syntax = "proto3";
package qwen;
service QwenService {
  rpc Chat (ChatRequest) returns (ChatResponse);
  rpc ChatStream (ChatRequest) returns (stream ChatResponse);
}
message ChatRequest  { repeated Message messages = 1; string model = 2; float temperature = 3; int32 max_tokens = 4; }
message ChatResponse { string id = 1; string content = 2; bool is_final = 3; int32 index = 4; }
message Message      { string role = 1; string content = 2; }
"""


def test_committed_stubs_match_the_generator(tmp_path):
    """The committed stubs (in the client package, which the server imports
    them from) are exactly what the generator writes."""
    subprocess.run([sys.executable, str(REPO / "proto" / "generate.py"), "--out", str(tmp_path)], check=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*") if "__pycache__" not in p.parts)
    assert generated, "the generator wrote nothing"
    committed = REPO / "clients" / "python" / "qwen_grpc_client" / "pb"
    for rel in generated:
        assert (committed / rel).read_text() == (tmp_path / rel).read_text(), (
            f"{committed / rel} is stale: run `make proto`"
        )
    assert not (REPO / "service" / "pb").exists(), "one copy of the stubs: the server imports the client package's"


def _legacy_messages(tmp_path):
    (tmp_path / "qwen").mkdir()
    (tmp_path / "qwen" / "legacy.proto").write_text(LEGACY_PROTO)
    out = tmp_path / "legacy.desc"
    from grpc_tools import protoc

    assert protoc.main(["protoc", f"-I{tmp_path}", f"--descriptor_set_out={out}", "qwen/legacy.proto"]) == 0
    file_set = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for proto in file_set.file:
        pool.Add(proto)
    get = lambda name: message_factory.GetMessageClass(pool.FindMessageTypeByName(name))  # noqa: E731
    return get("qwen.ChatRequest"), get("qwen.ChatResponse"), get("qwen.Message")


def test_old_clients_and_new_server_agree_on_bytes(tmp_path):
    OldRequest, OldResponse, OldMessage = _legacy_messages(tmp_path)
    old = OldRequest(
        messages=[OldMessage(role="user", content="héllo")],
        model="Qwen2.5-0.5B-Instruct",
        temperature=0.5,
        max_tokens=64,
    )
    new = pb.ChatRequest.FromString(old.SerializeToString())
    assert new.temperature == 0.5 and new.max_tokens == 64 and new.messages[0].content == "héllo"
    assert new.HasField("temperature") and not new.HasField("top_p")
    assert new.SerializeToString() == old.SerializeToString()

    # Nothing an old client sends asks for a response format: free text, as before.
    assert not new.HasField("response_format")
    from service.api.grpc_server import chat_params

    assert chat_params(new).response_format is None
    # A new client's response format is a field an old server skips; the old fields read the same.
    with_format = pb.ChatRequest(
        messages=[pb.Message(role="user", content="héllo")],
        max_tokens=64,
        response_format=pb.ResponseFormat(type=pb.ResponseFormat.TYPE_JSON_SCHEMA, json_schema='{"type": "object"}'),
    )
    seen_by_old_server = OldRequest.FromString(with_format.SerializeToString())
    assert seen_by_old_server.max_tokens == 64 and seen_by_old_server.messages[0].content == "héllo"

    # An old client that leaves temperature at 0 sends nothing: the server sees "unset".
    assert not pb.ChatRequest.FromString(OldRequest(temperature=0.0).SerializeToString()).HasField("temperature")

    response = pb.ChatResponse(
        id="chat-1",
        content="Paris",
        is_final=True,
        index=3,
        finish_reason=pb.FINISH_REASON_STOP,
        usage=pb.Usage(prompt_tokens=5, completion_tokens=2, total_tokens=7),
        model="Qwen2.5-0.5B-Instruct",
    )
    seen_by_old = OldResponse.FromString(response.SerializeToString())
    assert (seen_by_old.id, seen_by_old.content, seen_by_old.is_final, seen_by_old.index) == (
        "chat-1",
        "Paris",
        True,
        3,
    )
    legacy_only = pb.ChatResponse(id="chat-1", content="Paris", is_final=True, index=3)
    assert OldResponse(id="chat-1", content="Paris", is_final=True, index=3).SerializeToString() == (
        legacy_only.SerializeToString()
    )


def test_legacy_field_numbers_and_types_are_frozen():
    fields = {f.name: (f.number, f.type) for f in pb.ChatRequest.DESCRIPTOR.fields}
    F = descriptor_pb2.FieldDescriptorProto
    assert fields["messages"] == (1, F.TYPE_MESSAGE)
    assert fields["model"] == (2, F.TYPE_STRING)
    assert fields["temperature"] == (3, F.TYPE_FLOAT)
    assert fields["max_tokens"] == (4, F.TYPE_INT32)
    assert fields["response_format"] == (10, F.TYPE_MESSAGE)
    out = {f.name: (f.number, f.type) for f in pb.ChatResponse.DESCRIPTOR.fields}
    assert out["id"] == (1, F.TYPE_STRING) and out["content"] == (2, F.TYPE_STRING)
    assert out["is_final"] == (3, F.TYPE_BOOL) and out["index"] == (4, F.TYPE_INT32)


def test_sampling_fields_have_their_numbers_and_old_peers_skip_them(tmp_path):
    """n, logprobs, penalties and logit_bias (issue 13) are new numbers: an
    old server reads the legacy fields of such a request unchanged, an old
    client those of a response with logprobs and choices."""
    F = descriptor_pb2.FieldDescriptorProto
    fields = {f.name: (f.number, f.type) for f in pb.ChatRequest.DESCRIPTOR.fields}
    assert fields["n"] == (11, F.TYPE_INT32)
    assert fields["logprobs"] == (12, F.TYPE_BOOL)
    assert fields["top_logprobs"] == (13, F.TYPE_INT32)
    assert fields["presence_penalty"] == (14, F.TYPE_FLOAT)
    assert fields["frequency_penalty"] == (15, F.TYPE_FLOAT)
    assert fields["logit_bias"] == (16, F.TYPE_MESSAGE)  # a map is a repeated entry message
    out = {f.name: (f.number, f.type) for f in pb.ChatResponse.DESCRIPTOR.fields}
    assert out["logprobs"] == (8, F.TYPE_MESSAGE)
    assert out["choice_index"] == (10, F.TYPE_INT32)
    assert out["choices"] == (11, F.TYPE_MESSAGE)

    OldRequest, OldResponse, _ = _legacy_messages(tmp_path)
    request = pb.ChatRequest(
        messages=[pb.Message(role="user", content="héllo")],
        max_tokens=64,
        n=3,
        logprobs=True,
        top_logprobs=5,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logit_bias={17: 100.0},
    )
    seen_by_old_server = OldRequest.FromString(request.SerializeToString())
    assert seen_by_old_server.max_tokens == 64 and seen_by_old_server.messages[0].content == "héllo"

    from service.api.grpc_server import chat_params

    params = chat_params(request)
    assert (params.n, params.logprobs, params.top_logprobs) == (3, True, 5)
    assert (params.presence_penalty, params.frequency_penalty, params.logit_bias) == (0.5, -0.5, {17: 100.0})
    legacy = chat_params(pb.ChatRequest.FromString(OldRequest(max_tokens=4).SerializeToString()))
    assert (legacy.n, legacy.logprobs, legacy.top_logprobs, legacy.logit_bias) == (None, False, None, None)
    assert (legacy.presence_penalty, legacy.frequency_penalty) == (None, None)

    entry = pb.TokenLogprob(token="Paris", logprob=-0.1, token_bytes=b"Paris", token_id=7)
    response = pb.ChatResponse(
        id="chat-1",
        content="Paris",
        is_final=True,
        index=0,
        logprobs=[entry],
        choice_index=1,
        choices=[pb.Choice(index=0, content="Paris", logprobs=[entry]), pb.Choice(index=1, content="Rome")],
    )
    seen_by_old = OldResponse.FromString(response.SerializeToString())
    assert (seen_by_old.id, seen_by_old.content, seen_by_old.is_final, seen_by_old.index) == (
        "chat-1",
        "Paris",
        True,
        0,
    )


def test_tool_fields_have_their_numbers_and_old_peers_skip_them(tmp_path):
    F = descriptor_pb2.FieldDescriptorProto
    request = {f.name: (f.number, f.type) for f in pb.ChatRequest.DESCRIPTOR.fields}
    assert request["tools"] == (17, F.TYPE_MESSAGE) and request["tool_choice"] == (18, F.TYPE_MESSAGE)
    assert request["parallel_tool_calls"] == (19, F.TYPE_BOOL)
    message = {f.name: (f.number, f.type) for f in pb.Message.DESCRIPTOR.fields}
    assert message["tool_calls"] == (3, F.TYPE_MESSAGE) and message["tool_call_id"] == (4, F.TYPE_STRING)
    assert message["name"] == (5, F.TYPE_STRING)
    assert {f.name: f.number for f in pb.ChatResponse.DESCRIPTOR.fields}["tool_calls"] == 9
    assert pb.FINISH_REASON_TOOL_CALLS == 4

    OldRequest, OldResponse, _ = _legacy_messages(tmp_path)
    from service.api.grpc_server import chat_params

    # An old client's request asks for no tools.
    old = pb.ChatRequest.FromString(OldRequest(max_tokens=8).SerializeToString())
    params = chat_params(old)
    assert params.tools == [] and params.tool_choice is None and params.parallel_tool_calls is None
    # A new client's tools and tool messages are skipped by an old server, which reads the rest as before.
    call = pb.ToolCall(id="call_1", name="f", arguments="{}")
    new = pb.ChatRequest(
        messages=[
            pb.Message(role="assistant", content="", tool_calls=[call]),
            pb.Message(role="tool", content="42", tool_call_id="call_1", name="f"),
        ],
        max_tokens=8,
        tools=[pb.Tool(name="f", parameters='{"type": "object"}')],
        tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_REQUIRED),
    )
    seen = OldRequest.FromString(new.SerializeToString())
    assert seen.max_tokens == 8 and [(m.role, m.content) for m in seen.messages] == [("assistant", ""), ("tool", "42")]
    # A response with calls reads as before to an old client.
    response = pb.ChatResponse(id="chat-1", content="", is_final=True, index=0, tool_calls=[call])
    assert OldResponse.FromString(response.SerializeToString()).is_final
