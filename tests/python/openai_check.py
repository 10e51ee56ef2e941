#!/usr/bin/env python3
"""Puts one greedy question about an image to Tessera's HTTP API with the `openai`
package, plainly and streamed, plus two requests that must fail; prints one JSON
object for tests/python_clients.rs to compare with the gRPC answer.

    python openai_check.py --addr HOST:PORT --image IMG --max-tokens N QUESTION

The message is built by examples/python/openai_chat.py's `user_content`, so the
example's request shape is the one checked.
"""

import argparse
import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples" / "python"))

import openai  # noqa: E402
from openai_chat import user_content  # noqa: E402


def error_of(call):
    """What an API error raised by `call` looks like to an openai user."""
    try:
        call()
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        return {
            "class": type(e).__name__,
            "status": e.status_code,
            "type": body.get("type"),
            "code": body.get("code"),
            "param": body.get("param"),
            "message": body.get("message"),
        }
    return None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("question")
    parser.add_argument("--addr", required=True)
    parser.add_argument("--image", type=pathlib.Path, required=True)
    parser.add_argument("--max-tokens", type=int, required=True)
    args = parser.parse_args()

    client = openai.OpenAI(
        base_url=f"http://{args.addr}/v1", api_key="unused", max_retries=0
    )
    models = [m.id for m in client.models.list().data]
    request = dict(
        model=models[0],
        messages=[{"role": "user", "content": user_content(args.question, [args.image])}],
        max_tokens=args.max_tokens,
        temperature=0,
    )

    plain = client.chat.completions.create(**request)

    stream_text, stream_finish, stream_usage, content_chunks = "", None, None, 0
    for chunk in client.chat.completions.create(
        **request, stream=True, stream_options={"include_usage": True}
    ):
        assert chunk.object == "chat.completion.chunk", chunk
        if chunk.usage is not None:
            stream_usage = chunk.usage.model_dump()
        for choice in chunk.choices:
            if choice.delta.content:
                stream_text += choice.delta.content
                content_chunks += 1
            stream_finish = choice.finish_reason or stream_finish

    # Log probabilities, whole and streamed: each token's and its 2 best alternatives'.
    with_logprobs = client.chat.completions.create(**request, logprobs=True, top_logprobs=2)

    def entries(content):
        return [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": e.bytes,
                "top": [[t.token, t.logprob] for t in e.top_logprobs],
            }
            for e in content
        ]

    streamed_logprobs = []
    for chunk in client.chat.completions.create(
        **request, stream=True, logprobs=True, top_logprobs=2
    ):
        for choice in chunk.choices:
            if choice.logprobs is not None and choice.logprobs.content:
                streamed_logprobs += entries(choice.logprobs.content)

    out = {
        "logprobs_text": with_logprobs.choices[0].message.content,
        "logprobs": entries(with_logprobs.choices[0].logprobs.content),
        "streamed_logprobs": streamed_logprobs,
        "plain_logprobs": plain.choices[0].logprobs,
        "models": models,
        "plain_text": plain.choices[0].message.content,
        "plain_finish_reason": plain.choices[0].finish_reason,
        "usage": plain.usage.model_dump(),
        "stream_text": stream_text,
        "stream_finish_reason": stream_finish,
        "stream_usage": stream_usage,
        "stream_content_chunks": content_chunks,
        "unknown_model": error_of(
            lambda: client.chat.completions.create(**{**request, "model": "no-such-model"})
        ),
        "negative_temperature": error_of(
            lambda: client.chat.completions.create(**{**request, "temperature": -1})
        ),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
