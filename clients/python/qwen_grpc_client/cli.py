"""qwen-chat: stream an answer to the terminal.

    qwen-chat "What is the capital of France?"
    echo "Explain gRPC" | qwen-chat --target localhost:50051 --temperature 0 --max-tokens 200
    qwen-chat --target dns:///qwen-headless.default.svc.cluster.local:50051 --tls --root-certificates ca.pem "Hi"

The API key comes from --api-key or QWEN_API_KEY (the environment keeps it
out of shell history and `ps`).
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc

from . import QwenClient, finish_reason_name, session_metadata


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen-chat", description="Stream a chat answer from a qwen-grpc server.")
    parser.add_argument("prompt", nargs="?", help="the question (default: read standard input)")
    parser.add_argument(
        "--target", default="localhost:50051", help="host:port or dns:///name:port (default %(default)s)"
    )
    parser.add_argument("--model", default="", help="served model name (default: the server's default)")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--temperature", type=float, help="0 = greedy (default: server default)")
    parser.add_argument("--max-tokens", type=int, help="(default: server default)")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds (default %(default)s)")
    parser.add_argument("--usage", action="store_true", help="print finish reason and token usage to stderr")
    parser.add_argument(
        "--session-id",
        help="conversation key: calls with the same key go to the same replica "
        "(ring_hash over the fleet; sent as qwen-session-id)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("QWEN_API_KEY"),
        help="sent as `authorization: Bearer KEY` (default: $QWEN_API_KEY)",
    )
    parser.add_argument("--tls", action="store_true", help="use TLS (implied by the certificate flags)")
    parser.add_argument("--root-certificates", help="PEM file of the CA(s) to trust (default: system trust store)")
    parser.add_argument("--client-cert", help="PEM client certificate chain for mutual TLS")
    parser.add_argument("--client-key", help="PEM private key of --client-cert")
    parser.add_argument("--tls-server-name", help="name to verify in the server certificate (default: the target host)")
    args = parser.parse_args(argv)
    if (args.client_cert is None) != (args.client_key is None):
        parser.error("--client-cert and --client-key go together")
    try:
        session_metadata(args.session_id)
    except ValueError as error:
        parser.error(f"--session-id: {error}")

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": prompt}
    ]
    params = dict(
        model=args.model,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
        session_id=args.session_id,
    )
    connect_options = dict(
        api_key=args.api_key,
        tls=args.tls,
        root_certificates=args.root_certificates,
        client_certificate_chain=args.client_cert,
        client_private_key=args.client_key,
        tls_server_name=args.tls_server_name,
    )
    with QwenClient(args.target, timeout=args.timeout, **connect_options) as client:
        try:
            stream = client.stream(messages, **params)
            for response in stream:
                sys.stdout.write(response.content)
                sys.stdout.flush()
                if response.is_final:
                    sys.stdout.write("\n")
                    if args.usage:
                        usage = response.usage
                        reason = finish_reason_name(response)
                        print(
                            f"[finish={reason} prompt={usage.prompt_tokens} completion={usage.completion_tokens} "
                            f"total={usage.total_tokens} replica={stream.replica()}]",
                            file=sys.stderr,
                        )
        except grpc.RpcError as error:
            print(f"\nerror: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
