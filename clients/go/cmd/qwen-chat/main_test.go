package main

import (
	"io/ioutil"
	"path/filepath"
	"testing"

	"github.com/qwen-grpc/qwen-grpc/clients/go/qwenpb"
)

func TestDialTargetAddsDNSScheme(t *testing.T) {
	cases := map[string]string{
		"localhost:50051":                        "dns:///localhost:50051",
		"dns:///svc.ns.svc.cluster.local:50051":  "dns:///svc.ns.svc.cluster.local:50051",
		"dns://127.0.0.1:53/svc.cluster.local:1": "dns://127.0.0.1:53/svc.cluster.local:1",
		"unix:/run/qwen.sock":                    "unix:/run/qwen.sock",
	}
	for in, want := range cases {
		if got := dialTarget(in); got != want {
			t.Errorf("dialTarget(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestOnlyGivenFlagsAreSent(t *testing.T) {
	o, rest, err := parseFlags([]string{"-temperature", "0", "-max-tokens", "7", "-stop", "a", "-stop", "b", "hello", "world"})
	if err != nil {
		t.Fatal(err)
	}
	request := buildRequest(o, "hello world")
	if len(rest) != 2 || request.GetMessages()[0].GetContent() != "hello world" {
		t.Fatalf("prompt not taken from the arguments: %v %v", rest, request.GetMessages())
	}
	// An explicit 0 must be sent (greedy), not dropped as "unset".
	if request.Temperature == nil || *request.Temperature != 0 {
		t.Errorf("temperature = %v, want explicit 0", request.Temperature)
	}
	if request.MaxTokens == nil || *request.MaxTokens != 7 {
		t.Errorf("max_tokens = %v, want 7", request.MaxTokens)
	}
	if request.TopP != nil || request.TopK != nil || request.Seed != nil {
		t.Errorf("flags not given were sent: top_p=%v top_k=%v seed=%v", request.TopP, request.TopK, request.Seed)
	}
	if len(request.GetStop()) != 2 {
		t.Errorf("stop = %v, want [a b]", request.GetStop())
	}
}

func TestClientCertNeedsKey(t *testing.T) {
	if _, _, err := parseFlags([]string{"-client-cert", "c.pem", "x"}); err == nil {
		t.Fatal("a client certificate without its key was accepted")
	}
}

func TestJSONFlagsSetTheResponseFormat(t *testing.T) {
	o, _, err := parseFlags([]string{"hi"})
	if err != nil {
		t.Fatal(err)
	}
	if buildRequest(o, "hi").ResponseFormat != nil {
		t.Error("a response format was sent without -json or -json-schema")
	}
	o, _, err = parseFlags([]string{"-json", "hi"})
	if err != nil {
		t.Fatal(err)
	}
	if got := buildRequest(o, "hi").GetResponseFormat().GetType(); got != qwenpb.ResponseFormat_TYPE_JSON_OBJECT {
		t.Errorf("-json: type %v, want TYPE_JSON_OBJECT", got)
	}
	schema := `{"type": "object", "properties": {"on": {"type": "boolean"}}}`
	path := filepath.Join(t.TempDir(), "schema.json")
	if err := ioutil.WriteFile(path, []byte(schema), 0o600); err != nil {
		t.Fatal(err)
	}
	o, _, err = parseFlags([]string{"-json-schema", path, "hi"})
	if err != nil {
		t.Fatal(err)
	}
	format := buildRequest(o, "hi").GetResponseFormat()
	if format.GetType() != qwenpb.ResponseFormat_TYPE_JSON_SCHEMA || format.GetJsonSchema() != schema {
		t.Errorf("-json-schema: %v", format)
	}
	if _, _, err := parseFlags([]string{"-json-schema", filepath.Join(t.TempDir(), "missing.json"), "hi"}); err == nil {
		t.Error("a missing schema file was accepted")
	}
}

func TestSamplingFlagsAreSent(t *testing.T) {
	o, _, err := parseFlags([]string{"-n", "3", "-logprobs", "-top-logprobs", "2", "-frequency-penalty", "0.5",
		"-logit-bias", "17=100", "-logit-bias", "4=-2.5", "hi"})
	if err != nil {
		t.Fatal(err)
	}
	request := buildRequest(o, "hi")
	if request.GetN() != 3 || !request.GetLogprobs() || request.GetTopLogprobs() != 2 {
		t.Errorf("n=%d logprobs=%v top_logprobs=%d, want 3 true 2", request.GetN(), request.GetLogprobs(), request.GetTopLogprobs())
	}
	if request.FrequencyPenalty == nil || *request.FrequencyPenalty != 0.5 || request.PresencePenalty != nil {
		t.Errorf("penalties: frequency=%v presence=%v", request.FrequencyPenalty, request.PresencePenalty)
	}
	if len(request.GetLogitBias()) != 2 || request.GetLogitBias()[17] != 100 || request.GetLogitBias()[4] != -2.5 {
		t.Errorf("logit_bias = %v", request.GetLogitBias())
	}
	o, _, _ = parseFlags([]string{"hi"})
	if plain := buildRequest(o, "hi"); plain.N != nil || plain.Logprobs || plain.LogitBias != nil {
		t.Errorf("flags not given were sent: %v", plain)
	}
	if _, _, err := parseFlags([]string{"-logit-bias", "x=1", "hi"}); err == nil {
		t.Error("a malformed -logit-bias was accepted")
	}
}
