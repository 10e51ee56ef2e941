#!/usr/bin/env python3
"""Asks a Tessera cluster a question about images over gRPC and prints the answer
as it streams.

    python ask.py --addr 127.0.0.1:50051 --image cat.png "What is in the picture?"

The request is the one `tessera ask` sends: each image becomes an image part, in
front of the question, followed by a newline (`<image>\\n` in the prompt), and
sampling is greedy unless `--temperature` says otherwise. The text goes to stdout
delta by delta; a summary line (finish reason, token counts) goes to stderr. With
`--json` nothing streams and stdout gets one JSON object instead: `request_id`,
`output_ids`, `text`, `finish_reason`, `images` and `usage`.
"""

import argparse
import json
import pathlib
import sys
import threading

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "stubs"))

import grpc  # noqa: E402
from tessera.v1 import tessera_pb2, tessera_pb2_grpc  # noqa: E402

# The message size limit Tessera's servers and clients set (tessera_proto::MAX_MESSAGE_BYTES).
MAX_MESSAGE_BYTES = 256 * 1024 * 1024

MIME_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".bmp": "image/bmp",
}

FINISH_REASONS = {
    tessera_pb2.FINISH_REASON_EOS: "eos",
    tessera_pb2.FINISH_REASON_LENGTH: "length",
    tessera_pb2.FINISH_REASON_STOP: "stop",
}


class ClientError(Exception):
    """A failure to report on stderr before exiting with status 1."""


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Ask a Tessera cluster a question about images over gRPC."
    )
    parser.add_argument("question", help="the user message")
    parser.add_argument(
        "--addr",
        default="127.0.0.1:50051",
        help="the gateway's gRPC address, host:port (an http:// prefix is ignored) "
        "[default: %(default)s]",
    )
    parser.add_argument(
        "--image",
        action="append",
        default=[],
        type=pathlib.Path,
        help="an image for the question (repeatable, in order)",
    )
    parser.add_argument(
        "--max-tokens", type=int, help="most tokens to generate [default: the server's]"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature; 0 is greedy [default: %(default)s]",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed of sampling [default: %(default)s]"
    )
    parser.add_argument(
        "--ignore-eos",
        action="store_true",
        help="keep generating after the end-of-sequence token",
    )
    parser.add_argument(
        "--timeout-seconds",
        type=float,
        default=600.0,
        help="give up after this many seconds [default: %(default)s]",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON summary instead of streaming the text",
    )
    return parser.parse_args(argv)


def image_part(path):
    """An image part with the file's bytes and MIME type (empty: server detects)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ClientError(f"cannot read image {path}: {e.strerror}") from e
    mime_type = MIME_TYPES.get(path.suffix.lower(), "")
    return tessera_pb2.Part(image=tessera_pb2.Image(data=data, mime_type=mime_type))


def build_request(args):
    """The GenerateRequest `tessera ask` builds for the same flags."""
    parts = []
    for i, path in enumerate(args.image):
        parts.append(image_part(path))
        # `<image>\n` before the next image or the question.
        text = "\n" + (args.question if i == len(args.image) - 1 else "")
        parts.append(tessera_pb2.Part(text=text))
    if not args.image and args.question:
        parts.append(tessera_pb2.Part(text=args.question))
    stopping = tessera_pb2.StoppingParams(ignore_eos=args.ignore_eos)
    if args.max_tokens is not None:
        stopping.max_tokens = args.max_tokens
    return tessera_pb2.GenerateRequest(
        messages=[tessera_pb2.Message(role=tessera_pb2.ROLE_USER, parts=parts)],
        sampling=tessera_pb2.SamplingParams(
            temperature=args.temperature,
            top_p=1.0,
            top_k=0,
            repetition_penalty=1.0,
            seed=args.seed,
        ),
        stopping=stopping,
    )


def connect(addr, timeout):
    """A channel to `addr` once it is ready, or a ClientError saying what to do."""
    target = addr.removeprefix("http://")
    channel = grpc.insecure_channel(
        target,
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    # Wait for the first connection attempt to succeed or fail, not for retries.
    settled = threading.Event()
    states = []

    def on_change(state):
        if state in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE):
            states.append(state)
            settled.set()

    channel.subscribe(on_change, try_to_connect=True)
    settled.wait(timeout=min(timeout, 10.0))
    channel.unsubscribe(on_change)
    if not states or states[0] != grpc.ChannelConnectivity.READY:
        channel.close()
        raise ClientError(
            f"cannot reach Tessera at {target} (is `tessera up` running? see --addr)"
        )
    return channel


def stream_answer(stub, request, args):
    """Runs GenerateStream, printing deltas unless --json; returns the summary."""
    summary = {"request_id": "", "output_ids": [], "text": "", "finished": None}
    for message in stub.GenerateStream(request, timeout=args.timeout_seconds):
        summary["request_id"] = message.request_id
        kind = message.WhichOneof("event")
        if kind == "delta":
            summary["text"] += message.delta.text
            summary["output_ids"].extend(message.delta.token_ids)
            if not args.json:
                sys.stdout.write(message.delta.text)
                sys.stdout.flush()
        elif kind == "finished":
            summary["finished"] = message.finished
    if summary["finished"] is None:
        raise ClientError("the stream ended without its `finished` message")
    return summary


def report(summary):
    """The --json object, in the shape of `tessera ask --json` (without timings)."""
    finished = summary["finished"]
    return {
        "request_id": summary["request_id"],
        "output_ids": summary["output_ids"],
        "text": summary["text"],
        "finish_reason": FINISH_REASONS.get(finished.finish_reason, "unspecified"),
        "images": [
            {
                "tiling": {"width": i.tiles_x, "height": i.tiles_y},
                "tokens": i.tokens,
                "width": i.width,
                "height": i.height,
            }
            for i in finished.images
        ],
        "usage": {
            "prompt_tokens": finished.usage.prompt_tokens,
            "image_tokens": finished.usage.image_tokens,
            "completion_tokens": finished.usage.completion_tokens,
        },
    }


def main(argv=None):
    args = parse_args(argv)
    try:
        request = build_request(args)
        with connect(args.addr, args.timeout_seconds) as channel:
            summary = stream_answer(tessera_pb2_grpc.TesseraStub(channel), request, args)
    except ClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    out = report(summary)
    if args.json:
        print(json.dumps(out, ensure_ascii=False))
    else:
        usage = out["usage"]
        print()
        print(
            f"[{usage['prompt_tokens']} prompt tokens ({usage['image_tokens']} image), "
            f"{usage['completion_tokens']} generated, finish: {out['finish_reason']}]",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
