"""Drives `infermux serve` with fireworks-ai's DeploymentSampler, unmodified.

Run by crates/api/tests/fireworks_sdk.rs with the venv's Python (runtimes/py-sdks). Reads a
job (JSON) on stdin, writes the results (JSON) to stdout; logs go to stderr.

Jobs:
- {"mode": "parity", ...}: each case's `sample_with_tokens` (messages through the model
  folder's Hugging Face tokenizer), as the SDK returns it; plus the prompts the tokenizer made
  and two error replies (a wrong key, an unknown model) with the exception the SDK raised.
- {"mode": "load", ...}: `count` concurrent `sample_with_tokens` calls (a fixed window, so all
  are in flight at once); which succeeded, which failed and the statuses each attempt saw.
"""

import asyncio
import json
import sys
import time

import httpx
from fireworks.training.sdk import DeploymentSampler
from fireworks.training.sdk.concurrency import FixedConcurrencyController
from transformers import AutoTokenizer


def completion_json(c):
    return {
        "text": c.text,
        "full_tokens": c.full_tokens,
        "prompt_len": c.prompt_len,
        "finish_reason": c.finish_reason,
        "completion_len": c.completion_len,
        "inference_logprobs": c.inference_logprobs,
        "sampling_logprobs": c.sampling_logprobs,
        "logprobs_echoed": c.logprobs_echoed,
    }


def sampler(job, tokenizer, api_key=None, model=None, window=None):
    return DeploymentSampler(
        inference_url=job["base_url"],
        model=model or job["model"],
        api_key=api_key or job["api_key"],
        tokenizer=tokenizer,
        concurrency_controller=FixedConcurrencyController(window) if window else None,
    )


async def error_case(s, messages):
    """What the SDK raises for one request, and how long it took to give up."""
    t0 = time.monotonic()
    try:
        await s.sample_with_tokens(messages, n=1, max_tokens=2, temperature=0.0)
    except httpx.HTTPStatusError as e:
        return {
            "status": e.response.status_code,
            "body": e.response.json(),
            "seconds": time.monotonic() - t0,
        }
    except Exception as e:  # noqa: BLE001 - reported to the Rust test, which fails on it
        return {"unexpected": repr(e), "seconds": time.monotonic() - t0}
    return {"unexpected": "no error", "seconds": time.monotonic() - t0}


async def parity(job, tokenizer):
    s = sampler(job, tokenizer)
    out = {"prompts": [], "cases": []}
    for case in job["cases"]:
        out["prompts"].append(
            tokenizer.apply_chat_template(
                case["messages"], tokenize=True, add_generation_prompt=True, return_dict=False
            )
        )
        kwargs = dict(case.get("kwargs", {}))
        t0 = time.monotonic()
        got = await s.sample_with_tokens(
            case["messages"],
            n=case["n"],
            max_tokens=case["max_tokens"],
            temperature=case["temperature"],
            max_seq_len=case.get("max_seq_len"),
            **kwargs,
        )
        out["cases"].append(
            {
                "completions": [completion_json(c) for c in got],
                "seconds": time.monotonic() - t0,
                "attempts": [
                    {"status": m.http_status_code, "attempt": m.retry_attempt, "error": m.error}
                    for m in s.drain_metrics()
                ],
            }
        )
    messages = job["cases"][0]["messages"]
    out["wrong_key"] = await error_case(sampler(job, tokenizer, api_key="not-the-key"), messages)
    out["unknown_model"] = await error_case(
        sampler(job, tokenizer, model="accounts/someone/deployments/no-such-model"), messages
    )
    return out


async def load(job, tokenizer):
    count = job["count"]
    s = sampler(job, tokenizer, window=count)

    async def one(i):
        return await s.sample_with_tokens(
            [{"role": "user", "content": f"Count from {i} to {i + 5}."}],
            n=1,
            max_tokens=job["max_tokens"],
            temperature=1.0,
            seed=i,
            logprobs=True,
        )

    t0 = time.monotonic()
    results = await asyncio.gather(*[one(i) for i in range(count)], return_exceptions=True)
    wall = time.monotonic() - t0
    ok, failed = [], []
    for i, r in enumerate(results):
        if isinstance(r, BaseException):
            failed.append({"index": i, "error": repr(r)})
        else:
            ok.append({"index": i, "completions": [completion_json(c) for c in r]})
    attempts = [
        {"status": m.http_status_code, "attempt": m.retry_attempt, "error": m.error}
        for m in s.drain_metrics()
    ]
    return {"ok": ok, "failed": failed, "attempts": attempts, "seconds": wall}


def main():
    job = json.load(sys.stdin)
    tokenizer = AutoTokenizer.from_pretrained(job["tokenizer_dir"], local_files_only=True)
    run = {"parity": parity, "load": load}[job["mode"]]
    json.dump(asyncio.run(run(job, tokenizer)), sys.stdout)


if __name__ == "__main__":
    main()
