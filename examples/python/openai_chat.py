#!/usr/bin/env python3
"""Asks a Tessera cluster a question about images through its OpenAI-compatible
HTTP API with the `openai` package.

    tessera up --model DIR --http 127.0.0.1:8000
    python openai_chat.py --addr 127.0.0.1:8000 --image cat.png "What is in the picture?"
    python openai_chat.py --addr 127.0.0.1:8000 --image cat.png --stream "What is it?"

Images travel inline as base64 `data:` URIs, each followed by a newline, then the
question: the same prompt `ask.py` and `tessera ask` send over gRPC. The model is the
one the server lists under /v1/models unless `--model` names it. The answer goes to
stdout; the finish reason and usage go to stderr.
"""

import argparse
import base64
import pathlib
import sys

import openai

MIME_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".bmp": "image/bmp",
}


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Ask a Tessera cluster a question about images with the openai package."
    )
    parser.add_argument("question", help="the user message")
    parser.add_argument(
        "--addr",
        default="127.0.0.1:8000",
        help="the HTTP address `tessera up --http` printed, host:port [default: %(default)s]",
    )
    parser.add_argument(
        "--image",
        action="append",
        default=[],
        type=pathlib.Path,
        help="an image for the question (repeatable, in order)",
    )
    parser.add_argument(
        "--model", help="the served model's id [default: the one /v1/models lists]"
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
        "--stream", action="store_true", help="print the answer as it is generated"
    )
    return parser.parse_args(argv)


def data_uri(path):
    """The image file as a base64 `data:` URI."""
    mime = MIME_TYPES.get(path.suffix.lower())
    if mime is None:
        raise ValueError(
            f"{path}: unknown image type; use one of {', '.join(sorted(MIME_TYPES))}"
        )
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read image {path}: {e.strerror}") from e
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def user_content(question, images):
    """A user message's content: each image then a newline, then the question."""
    if not images:
        return question
    content = []
    for i, path in enumerate(images):
        content.append({"type": "image_url", "image_url": {"url": data_uri(path)}})
        text = "\n" + (question if i == len(images) - 1 else "")
        content.append({"type": "text", "text": text})
    return content


def main(argv=None):
    args = parse_args(argv)
    try:
        messages = [{"role": "user", "content": user_content(args.question, args.image)}]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    client = openai.OpenAI(base_url=f"http://{args.addr}/v1", api_key="unused")
    try:
        model = args.model or client.models.list().data[0].id
        request = dict(model=model, messages=messages, temperature=args.temperature)
        if args.max_tokens is not None:
            request["max_tokens"] = args.max_tokens
        if args.stream:
            finish_reason, usage = None, None
            stream = client.chat.completions.create(
                **request, stream=True, stream_options={"include_usage": True}
            )
            for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    sys.stdout.write(choice.delta.content or "")
                    sys.stdout.flush()
                    finish_reason = choice.finish_reason or finish_reason
        else:
            completion = client.chat.completions.create(**request)
            choice = completion.choices[0]
            sys.stdout.write(choice.message.content)
            finish_reason, usage = choice.finish_reason, completion.usage
    except openai.APIConnectionError:
        print(
            f"error: cannot reach Tessera at http://{args.addr} "
            "(is `tessera up --http ADDR` running? see --addr)",
            file=sys.stderr,
        )
        return 1
    except openai.APIStatusError as e:
        print(f"error: HTTP {e.status_code}: {e.message}", file=sys.stderr)
        return 1
    print()
    if usage is not None:
        print(
            f"[{usage.prompt_tokens} prompt tokens, {usage.completion_tokens} generated, "
            f"finish: {finish_reason}]",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
