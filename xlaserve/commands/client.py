"""`xlaserve client`: send one prompt to a running xlaserve server and print the completion."""

from __future__ import annotations

import argparse
import json
import sys

from xlaserve.cli import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="127.0.0.1:50051", help="server HOST:PORT")
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--chat", action="store_true",
                        help="send the prompt as one user chat message (chat template applied)")
    parser.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", help="a stop string (repeatable)")
    parser.add_argument("--timeout", type=float, default=600.0, help="deadline in seconds")
    parser.add_argument("--json", action="store_true", help="print a JSON summary at the end")


def run(args: argparse.Namespace) -> int:
    import grpc

    from xlaserve.serve.client import FINISH_REASON_NAMES, XlaserveClient

    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature,
                "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed,
                "stop": args.stop or None}
    inputs = ({"messages": [{"role": "user", "content": args.prompt}]} if args.chat
              else {"prompt": args.prompt})
    with XlaserveClient(args.target, timeout_s=args.timeout) as client:
        try:
            if args.stream:
                text, final = [], None
                for resp in client.generate_stream(**inputs, **sampling):
                    print(resp.delta.text, end="", flush=True)
                    text.append(resp.delta.text)
                    if resp.HasField("final"):
                        final = resp.final
                print()
                summary = {"text": "".join(text),
                           "finish_reason": FINISH_REASON_NAMES.get(final.finish_reason)
                           if final else None,
                           "completion_tokens": final.completion_tokens if final else 0}
            else:
                out = client.generate(**inputs, **sampling)
                print(out.text)
                summary = {"text": out.text, "finish_reason": out.finish_reason,
                           "completion_tokens": out.completion_tokens}
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise UsageError(e.details()) from e
            print(f"xlaserve client: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(summary))
    return 0
