// Command qwen-chat streams a chat answer from a fleet of qwen-grpc replicas.
//
//	qwen-chat -target dns:///qwen-headless.default.svc.cluster.local:50051 "What is gRPC?"
//	echo "Explain DNS" | qwen-chat -target localhost:50051 -temperature 0 -max-tokens 200
//
// The channel balances calls round_robin over every address the DNS name
// resolves to, skips replicas whose health is NOT_SERVING (loading or
// draining), pings idle connections to notice dead links, and retries a call
// that was refused with UNAVAILABLE before any answer arrived.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	_ "google.golang.org/grpc/health" // registers the client-side health checker used by healthCheckConfig
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/qwen-grpc/qwen-grpc/clients/go/qwenpb"
)

// serviceConfig mirrors the Python SDK's. grpc-go before 1.40 only honours
// retryPolicy with GRPC_GO_RETRY=on, so streamChat also retries by itself.
const serviceConfig = `{
  "loadBalancingConfig": [{"round_robin": {}}],
  "healthCheckConfig": {"serviceName": "qwen.QwenService"},
  "methodConfig": [{
    "name": [{"service": "qwen.QwenService"}],
    "retryPolicy": {
      "maxAttempts": 3,
      "initialBackoff": "0.1s",
      "maxBackoff": "1s",
      "backoffMultiplier": 2,
      "retryableStatusCodes": ["UNAVAILABLE"]
    }
  }]
}`

// maxAttempts bounds the retries of a stream refused before its first message.
const maxAttempts = 3

// replicaHeader names the replica that served a call (see service/api/replica.py).
const replicaHeader = "qwen-replica"

type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

type options struct {
	target, model, system             string
	temperature, topP                 float64
	maxTokens, topK                   int
	seed                              int64
	stop                              stringList
	timeout, keepalive                time.Duration
	usage                             bool
	apiKey                            string
	useTLS                            bool
	rootCerts, clientCert, clientKey  string
	tlsServerName                     string
	jsonSchema                        string
	jsonMode                          bool
	n, topLogprobs                    int
	logprobs                          bool
	presencePenalty, frequencyPenalty float64
	logitBias                         map[int32]float32
	set                               map[string]bool // flags given on the command line
}

// biasFlag parses repeatable -logit-bias TOKEN_ID=BIAS.
type biasFlag map[int32]float32

func (b biasFlag) String() string { return fmt.Sprint(map[int32]float32(b)) }
func (b biasFlag) Set(v string) error {
	parts := strings.SplitN(v, "=", 2)
	if len(parts) != 2 {
		return fmt.Errorf("want TOKEN_ID=BIAS, got %q", v)
	}
	id, err := strconv.ParseInt(parts[0], 10, 32)
	if err != nil {
		return fmt.Errorf("token id %q: %v", parts[0], err)
	}
	bias, err := strconv.ParseFloat(parts[1], 32)
	if err != nil {
		return fmt.Errorf("bias %q: %v", parts[1], err)
	}
	b[int32(id)] = float32(bias)
	return nil
}

func parseFlags(args []string) (*options, []string, error) {
	o := &options{logitBias: map[int32]float32{}}
	fs := flag.NewFlagSet("qwen-chat", flag.ContinueOnError)
	fs.StringVar(&o.target, "target", "localhost:50051", "host:port or dns://[DNS-SERVER]/name:port")
	fs.StringVar(&o.model, "model", "", "served model name (default: the server's default)")
	fs.StringVar(&o.system, "system", "", "system prompt")
	fs.Float64Var(&o.temperature, "temperature", 0, "0 = greedy (default: server default)")
	fs.IntVar(&o.maxTokens, "max-tokens", 0, "most tokens to generate (default: server default)")
	fs.Float64Var(&o.topP, "top-p", 0, "nucleus sampling mass (default: server default)")
	fs.IntVar(&o.topK, "top-k", 0, "keep the k most likely tokens (default: server default)")
	fs.Int64Var(&o.seed, "seed", 0, "sampling seed (default: random)")
	fs.Var(&o.stop, "stop", "stop string (repeatable)")
	fs.DurationVar(&o.timeout, "timeout", 300*time.Second, "deadline of the call")
	fs.DurationVar(&o.keepalive, "keepalive", 30*time.Second, "keepalive ping interval (the server accepts >= 10s by default)")
	fs.StringVar(&o.jsonSchema, "json-schema", "", "answer as JSON valid against the JSON Schema in this file")
	fs.BoolVar(&o.jsonMode, "json", false, "answer as a JSON object")
	fs.IntVar(&o.n, "n", 1, "answers from one prefill (choice i samples with seed+i); choices after the first print after it")
	fs.BoolVar(&o.logprobs, "logprobs", false, "print each token's logprob to stderr (after the answer)")
	fs.IntVar(&o.topLogprobs, "top-logprobs", 0, "with -logprobs: also the 0..20 most likely alternatives")
	fs.Float64Var(&o.presencePenalty, "presence-penalty", 0, "OpenAI's presence penalty in [-2, 2] (default: 0)")
	fs.Float64Var(&o.frequencyPenalty, "frequency-penalty", 0, "OpenAI's frequency penalty in [-2, 2] (default: 0)")
	fs.Var(biasFlag(o.logitBias), "logit-bias", "TOKEN_ID=BIAS added to that token's logit, BIAS in [-100, 100] (repeatable)")
	fs.BoolVar(&o.usage, "usage", false, "print finish reason, token usage and replica to stderr")
	fs.StringVar(&o.apiKey, "api-key", os.Getenv("QWEN_API_KEY"), "sent as 'authorization: Bearer KEY' (default: $QWEN_API_KEY)")
	fs.BoolVar(&o.useTLS, "tls", false, "use TLS (implied by the certificate flags)")
	fs.StringVar(&o.rootCerts, "root-certificates", "", "PEM file of the CA(s) to trust (default: system pool)")
	fs.StringVar(&o.clientCert, "client-cert", "", "PEM client certificate for mutual TLS")
	fs.StringVar(&o.clientKey, "client-key", "", "PEM private key of -client-cert")
	fs.StringVar(&o.tlsServerName, "tls-server-name", "", "name to verify in the server certificate")
	if err := fs.Parse(args); err != nil {
		return nil, nil, err
	}
	o.set = map[string]bool{}
	fs.Visit(func(f *flag.Flag) { o.set[f.Name] = true })
	if (o.clientCert == "") != (o.clientKey == "") {
		return nil, nil, errors.New("-client-cert and -client-key go together")
	}
	if o.jsonSchema != "" {
		schema, err := ioutil.ReadFile(o.jsonSchema)
		if err != nil {
			return nil, nil, err
		}
		o.jsonSchema = string(schema)
	}
	return o, fs.Args(), nil
}

// dialTarget adds dns:/// to a bare host:port so every A record is a backend.
func dialTarget(target string) string {
	if strings.Contains(target, "://") || strings.HasPrefix(target, "unix:") {
		return target
	}
	return "dns:///" + target
}

func transportCredentials(o *options) (grpc.DialOption, error) {
	if !o.useTLS && o.rootCerts == "" && o.clientCert == "" {
		return grpc.WithInsecure(), nil
	}
	config := &tls.Config{ServerName: o.tlsServerName, MinVersion: tls.VersionTLS12}
	if o.rootCerts != "" {
		pem, err := ioutil.ReadFile(o.rootCerts)
		if err != nil {
			return nil, err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("no certificate in %s", o.rootCerts)
		}
		config.RootCAs = pool
	}
	if o.clientCert != "" {
		pair, err := tls.LoadX509KeyPair(o.clientCert, o.clientKey)
		if err != nil {
			return nil, err
		}
		config.Certificates = []tls.Certificate{pair}
	}
	return grpc.WithTransportCredentials(credentials.NewTLS(config)), nil
}

func buildRequest(o *options, prompt string) *qwenpb.ChatRequest {
	var messages []*qwenpb.Message
	if o.system != "" {
		messages = append(messages, &qwenpb.Message{Role: "system", Content: o.system})
	}
	messages = append(messages, &qwenpb.Message{Role: "user", Content: prompt})
	request := &qwenpb.ChatRequest{Messages: messages, Model: o.model, Stop: o.stop}
	// Only flags given on the command line are sent; the rest take server defaults.
	if o.set["temperature"] {
		v := float32(o.temperature)
		request.Temperature = &v
	}
	if o.set["max-tokens"] {
		v := int32(o.maxTokens)
		request.MaxTokens = &v
	}
	if o.set["top-p"] {
		v := float32(o.topP)
		request.TopP = &v
	}
	if o.set["top-k"] {
		v := int32(o.topK)
		request.TopK = &v
	}
	if o.set["seed"] {
		v := o.seed
		request.Seed = &v
	}
	if o.set["n"] {
		v := int32(o.n)
		request.N = &v
	}
	request.Logprobs = o.logprobs
	if o.set["top-logprobs"] {
		v := int32(o.topLogprobs)
		request.TopLogprobs = &v
	}
	if o.set["presence-penalty"] {
		v := float32(o.presencePenalty)
		request.PresencePenalty = &v
	}
	if o.set["frequency-penalty"] {
		v := float32(o.frequencyPenalty)
		request.FrequencyPenalty = &v
	}
	if len(o.logitBias) > 0 {
		request.LogitBias = o.logitBias
	}
	// The server constrains decoding to the format (ChatRequest.response_format).
	if o.jsonSchema != "" {
		request.ResponseFormat = &qwenpb.ResponseFormat{Type: qwenpb.ResponseFormat_TYPE_JSON_SCHEMA, JsonSchema: o.jsonSchema}
	} else if o.jsonMode {
		request.ResponseFormat = &qwenpb.ResponseFormat{Type: qwenpb.ResponseFormat_TYPE_JSON_OBJECT}
	}
	return request
}

// streamChat writes the answer to out. A stream refused with UNAVAILABLE
// before its first message did no work, so it is retried (round_robin sends
// the next attempt to another replica).
func streamChat(ctx context.Context, client qwenpb.QwenServiceClient, request *qwenpb.ChatRequest, out io.Writer) (*qwenpb.ChatResponse, string, *transcript, error) {
	backoff := 100 * time.Millisecond
	for attempt := 1; ; attempt++ {
		t := &transcript{others: map[int32]*strings.Builder{}, logprobs: map[int32][]*qwenpb.TokenLogprob{}}
		final, replica, received, err := streamOnce(ctx, client, request, out, t)
		if err == nil || received || status.Code(err) != codes.Unavailable || attempt == maxAttempts {
			return final, replica, t, err
		}
		select {
		case <-ctx.Done():
			return nil, "", nil, err
		case <-time.After(backoff):
		}
		backoff *= 2
	}
}

// transcript keeps what is not written as it streams: the text of choices
// after the first (-n), and every token's logprobs (-logprobs).
type transcript struct {
	others   map[int32]*strings.Builder
	logprobs map[int32][]*qwenpb.TokenLogprob
}

func streamOnce(ctx context.Context, client qwenpb.QwenServiceClient, request *qwenpb.ChatRequest, out io.Writer, t *transcript) (*qwenpb.ChatResponse, string, bool, error) {
	var header metadata.MD
	stream, err := client.ChatStream(ctx, request)
	if err != nil {
		return nil, "", false, err
	}
	received := false
	for {
		response, err := stream.Recv()
		if err == io.EOF {
			return nil, replicaOf(header), received, errors.New("stream ended without a final message")
		}
		if err != nil {
			return nil, replicaOf(header), received, err
		}
		if !received {
			received = true
			// The server sends its headers with the first message.
			header, _ = stream.Header()
		}
		choice := response.GetChoiceIndex()
		t.logprobs[choice] = append(t.logprobs[choice], response.GetLogprobs()...)
		if choice != 0 {
			if t.others[choice] == nil {
				t.others[choice] = &strings.Builder{}
			}
			t.others[choice].WriteString(response.GetContent())
		} else if _, err := io.WriteString(out, response.GetContent()); err != nil {
			return nil, replicaOf(header), received, err
		}
		if response.GetIsFinal() {
			return response, replicaOf(header), received, nil
		}
	}
}

// printLogprobs writes one line per token: choice, token, logprob, then the alternatives.
func printLogprobs(w io.Writer, logprobs map[int32][]*qwenpb.TokenLogprob) {
	for choice := int32(0); choice < int32(len(logprobs)); choice++ {
		for _, entry := range logprobs[choice] {
			fmt.Fprintf(w, "%d\t%q\t%.4f", choice, entry.GetToken(), entry.GetLogprob())
			for _, top := range entry.GetTopLogprobs() {
				fmt.Fprintf(w, "\t%q=%.4f", top.GetToken(), top.GetLogprob())
			}
			fmt.Fprintln(w)
		}
	}
}

func replicaOf(md metadata.MD) string {
	if values := md.Get(replicaHeader); len(values) > 0 {
		return values[0]
	}
	return ""
}

func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	o, rest, err := parseFlags(args)
	if err != nil {
		if err == flag.ErrHelp {
			return 0
		}
		fmt.Fprintln(stderr, "qwen-chat:", err)
		return 2
	}
	prompt := strings.Join(rest, " ")
	if len(rest) == 0 {
		data, err := ioutil.ReadAll(stdin)
		if err != nil {
			fmt.Fprintln(stderr, "qwen-chat: reading stdin:", err)
			return 2
		}
		prompt = string(data)
	}
	transport, err := transportCredentials(o)
	if err != nil {
		fmt.Fprintln(stderr, "qwen-chat:", err)
		return 2
	}
	conn, err := grpc.Dial(dialTarget(o.target),
		transport,
		grpc.WithDefaultServiceConfig(serviceConfig),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: o.keepalive, Timeout: 10 * time.Second, PermitWithoutStream: true}),
	)
	if err != nil {
		fmt.Fprintln(stderr, "qwen-chat:", err)
		return 2
	}
	defer conn.Close()

	// Ctrl-C cancels the call, which cancels the generation on the server.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	if o.apiKey != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+o.apiKey)
	}

	final, replica, t, err := streamChat(ctx, qwenpb.NewQwenServiceClient(conn), buildRequest(o, prompt), stdout)
	if err != nil {
		fmt.Fprintf(stderr, "\nerror: %s: %s\n", status.Code(err), status.Convert(err).Message())
		if status.Code(err) == codes.Canceled {
			return 130
		}
		return 1
	}
	fmt.Fprintln(stdout)
	for choice := int32(1); choice < int32(len(t.others))+1; choice++ {
		fmt.Fprintf(stdout, "--- choice %d ---\n%s\n", choice, t.others[choice].String())
	}
	printLogprobs(stderr, t.logprobs)
	if o.usage {
		u := final.GetUsage()
		reason := strings.ToLower(strings.TrimPrefix(final.GetFinishReason().String(), "FINISH_REASON_"))
		fmt.Fprintf(stderr, "[finish=%s prompt=%d completion=%d total=%d replica=%s]\n",
			reason, u.GetPromptTokens(), u.GetCompletionTokens(), u.GetTotalTokens(), replica)
	}
	return 0
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}
