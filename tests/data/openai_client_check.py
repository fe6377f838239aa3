"""Drives an `infermux serve` endpoint with the official `openai` Python client.

Usage: python openai_client_check.py --base-url http://127.0.0.1:PORT/v1 --model NAME
Prints one `ok: ...` line per check and `ALL OK` at the end; exits non-zero on the first failure.
"""

import argparse
import json
import sys

import openai


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0, timeout=300)
    model = args.model

    ids = [m.id for m in client.models.list().data]
    assert model in ids, ids
    print("ok: models.list", ids)

    # Completions: greedy, usage, finish reason.
    c = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=5, temperature=0
    )
    text = c.choices[0].text
    assert "Paris" in text, text
    assert c.choices[0].finish_reason == "length", c
    assert c.usage.completion_tokens == 5 and c.usage.prompt_tokens == 5, c.usage
    print("ok: completions", repr(text))

    # Logprobs and n > 1.
    c = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=4, temperature=0.8,
        seed=7, n=2, logprobs=2,
    )
    assert len(c.choices) == 2, c
    assert sorted(ch.index for ch in c.choices) == [0, 1], c
    for ch in c.choices:
        lp = ch.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4, lp
        assert all(x <= 0.0 for x in lp.token_logprobs), lp
        assert all(len(t) == 2 for t in lp.top_logprobs), lp
    assert c.usage.completion_tokens == 8, c.usage
    print("ok: completions logprobs=2 n=2")

    # Echo with logprobs scores the prompt too.
    c = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=1, temperature=0,
        echo=True, logprobs=1,
    )
    assert c.choices[0].text.startswith("The capital of France is"), c
    assert c.choices[0].logprobs.token_logprobs[0] is None, c
    assert len(c.choices[0].logprobs.tokens) == 6, c
    print("ok: completions echo")

    # Streaming completions equal the non-streamed text.
    whole = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=8, temperature=0
    ).choices[0].text
    parts, finish = [], None
    for chunk in client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
    ):
        for ch in chunk.choices:
            parts.append(ch.text)
            finish = ch.finish_reason or finish
    assert "".join(parts) == whole, (parts, whole)
    assert finish == "length", finish
    print("ok: completions stream", repr("".join(parts)))

    # Chat with logprobs.
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(
        model=model, messages=messages, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2
    )
    msg = r.choices[0].message
    assert msg.role == "assistant" and "Paris" in msg.content, r
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens, r
    assert len(content[0].top_logprobs) == 2, content[0]
    print("ok: chat logprobs", repr(msg.content))

    # Chat, n > 1.
    r = client.chat.completions.create(
        model=model, messages=messages, max_completion_tokens=6, temperature=1.0, seed=1, n=3
    )
    assert len(r.choices) == 3, r
    assert r.usage.completion_tokens <= 18, r.usage
    print("ok: chat n=3")

    # Chat streaming with usage.
    deltas, usage, roles = [], None, []
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.role:
                roles.append(ch.delta.role)
            if ch.delta.content:
                deltas.append(ch.delta.content)
    assert roles == ["assistant"], roles
    assert "".join(deltas) == msg.content, (deltas, msg.content)
    assert usage is not None and usage.completion_tokens == len(content), usage
    print("ok: chat stream + include_usage", repr("".join(deltas)))

    # Structured output: a JSON schema.
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "country": {"type": "string", "maxLength": 20},
        },
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Name a city and its country as JSON."}],
        max_tokens=80,
        temperature=0.7,
        seed=3,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "place", "schema": schema, "strict": True},
        },
    )
    value = json.loads(r.choices[0].message.content)
    assert set(value) == {"city", "country"}, value
    assert all(isinstance(v, str) for v in value.values()), value
    print("ok: response_format json_schema", value)

    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Reply in JSON."}], max_tokens=60,
        temperature=0, response_format={"type": "json_object"},
    )
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict), r
    print("ok: response_format json_object", r.choices[0].finish_reason)

    # Errors surface as the client's typed exceptions.
    try:
        client.completions.create(model=model, prompt="x", max_tokens=2, top_p=0)
        raise AssertionError("top_p=0 was accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and "top_p" in str(e), e
    try:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
        raise AssertionError("an unknown model was accepted")
    except openai.NotFoundError as e:
        assert e.status_code == 404, e
    print("ok: errors (400, 404)")

    print("ALL OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
