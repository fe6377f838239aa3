"""Drives `infermux serve` with the official `tinker` SDK, unmodified (tests/tinker_sdk.rs).

Usage: drive.py MODE SPEC.json, MODE one of `parity`, `load`, `errors`. SPEC holds `base_url`,
`api_key`, `model` and the mode's cases. Prints one JSON object on the last stdout line.

Every HTTP reply the SDK receives is recorded by wrapping `httpx.AsyncClient.send` (the SDK's
transport here: the server's client config turns pyqwest off), so the test sees what the SDK's
own retry loops saw (429s and their `Retry-After`, any 5xx) without touching the SDK.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import warnings
from collections import Counter
from typing import Any

import httpx

# `sample_async` / `compute_logprobs_async` are deprecated in 0.38 (FutureWarning), still shipped
# and still what many scripts call: drive them, without the noise.
warnings.simplefilter("ignore", FutureWarning)

import tinker  # noqa: E402
from tinker import types  # noqa: E402

REPLIES: list[dict[str, Any]] = []
_send = httpx.AsyncClient.send


async def _recording_send(self, request, *args, **kwargs):
    response = await _send(self, request, *args, **kwargs)
    REPLIES.append(
        {
            "method": request.method,
            "path": request.url.path,
            "status": response.status_code,
            "retry_after": response.headers.get("retry-after"),
        }
    )
    return response


httpx.AsyncClient.send = _recording_send


def http_summary() -> dict[str, Any]:
    by = Counter(f"{r['method']} {r['path']} {r['status']}" for r in REPLIES)
    return {
        "replies": len(REPLIES),
        "by_route_and_status": dict(sorted(by.items())),
        "status_429": sum(r["status"] == 429 for r in REPLIES),
        "status_429_with_retry_after": sum(
            r["status"] == 429 and (r["retry_after"] or "").strip().isdigit() for r in REPLIES
        ),
        "status_5xx": sum(r["status"] >= 500 for r in REPLIES),
    }


def params(p: dict[str, Any]) -> types.SamplingParams:
    return types.SamplingParams(**p)


def prompt(ids: list[int]) -> types.ModelInput:
    return types.ModelInput.from_ints(ids)


def num(x):
    """A logprob as its exact decimal text (`repr`): JSON readers may round numbers."""
    return None if x is None else repr(float(x))


def nums(xs):
    return None if xs is None else [num(x) for x in xs]


def topk_rows(rows):
    if rows is None:
        return None
    return [None if r is None else [[int(t), num(lp)] for t, lp in r] for r in rows]


def response_json(r: types.SampleResponse) -> dict[str, Any]:
    return {
        "sequences": [
            {
                "tokens": list(s.tokens),
                "logprobs": nums(s.logprobs),
                "stop_reason": s.stop_reason,
                "topk_logprobs": topk_rows(s.topk_logprobs),
                "sequence_id": s.sequence_id,
            }
            for s in r.sequences
        ],
        "prompt_logprobs": nums(r.prompt_logprobs),
        "topk_prompt_logprobs": topk_rows(r.topk_prompt_logprobs),
    }


def sample_kwargs(case: dict[str, Any]) -> dict[str, Any]:
    return {
        "prompt": prompt(case["prompt"]),
        "num_samples": case["num_samples"],
        "sampling_params": params(case["params"]),
        "include_prompt_logprobs": case.get("include_prompt_logprobs", False),
        "topk_prompt_logprobs": case.get("topk_prompt_logprobs", 0),
        "topk_sample_logprobs": case.get("topk_sample_logprobs", 0),
    }


def service(spec: dict[str, Any]) -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=spec["base_url"], api_key=spec["api_key"])


def parity(spec: dict[str, Any]) -> dict[str, Any]:
    sc = service(spec)
    sampler = sc.create_sampling_client(base_model=spec["model"]).result()
    out: dict[str, Any] = {"base_model": sampler.get_base_model()}
    # Sync: every request submitted first (APIFutures), then `.result()` on each.
    futures = [sampler.sample(**sample_kwargs(c)) for c in spec["cases"]]
    scores = [sampler.compute_logprobs(prompt(p)) for p in spec["score"]]
    out["sync"] = {
        "samples": [response_json(f.result()) for f in futures],
        "scores": [nums(f.result()) for f in scores],
    }

    async def run_async() -> dict[str, Any]:
        samples = asyncio.gather(*(sampler.sample_async(**sample_kwargs(c)) for c in spec["cases"]))
        scores = asyncio.gather(*(sampler.compute_logprobs_async(prompt(p)) for p in spec["score"]))
        # And the 0.38 spelling: the APIFutures `sample()` / `compute_logprobs()` return, awaited.
        awaited = asyncio.gather(*(sampler.sample(**sample_kwargs(c)) for c in spec["cases"]))
        awaited_scores = asyncio.gather(*(sampler.compute_logprobs(prompt(p)) for p in spec["score"]))
        return {
            "async": {
                "samples": [response_json(r) for r in await samples],
                "scores": [nums(s) for s in await scores],
            },
            "awaited": {
                "samples": [response_json(r) for r in await awaited],
                "scores": [nums(s) for s in await awaited_scores],
            },
        }

    out.update(asyncio.run(run_async()))
    # A `tinker://` model_path naming the served model: the SDK asks the server for the base
    # model (GET /api/v1/samplers/{id}) and samples the same weights.
    by_path = sc.create_sampling_client(model_path=spec["model_path"]).result()
    out["model_path"] = {
        "base_model": by_path.get_base_model(),
        "sample": response_json(by_path.sample(**sample_kwargs(spec["cases"][0])).result()),
    }
    # Finishing the session (POST /api/v1/sessions/{id}/finish) and closing the holders.
    sc.close("success").result()
    out["http"] = http_summary()
    return out


def lora(spec: dict[str, Any]) -> dict[str, Any]:
    """A sampling client made from a `tinker://` model_path naming a loaded LoRA adapter."""
    sc = service(spec)
    sampler = sc.create_sampling_client(model_path=spec["model_path"]).result()
    out: dict[str, Any] = {
        "base_model": sampler.get_base_model(),
        "sample": response_json(sampler.sample(**sample_kwargs(spec["cases"][0])).result()),
        "score": nums(sampler.compute_logprobs(prompt(spec["score"])).result()),
    }
    sc.close("success").result()
    out["http"] = http_summary()
    return out


def load(spec: dict[str, Any]) -> dict[str, Any]:
    sc = service(spec)
    sampler = sc.create_sampling_client(base_model=spec["model"]).result()

    async def run() -> list[dict[str, Any]]:
        results = await asyncio.gather(
            *(sampler.sample(**sample_kwargs(c)) for c in spec["cases"]), return_exceptions=True
        )
        return [
            {"error": f"{type(r).__name__}: {r}"} if isinstance(r, BaseException) else response_json(r)
            for r in results
        ]

    start = time.monotonic()
    results = asyncio.run(run())
    return {"seconds": time.monotonic() - start, "results": results, "http": http_summary()}


def attempt(name: str, f) -> dict[str, Any]:
    start = time.monotonic()
    try:
        value = f()
        outcome: dict[str, Any] = {"ok": True, "value": repr(value)[:200]}
    except Exception as e:  # noqa: BLE001 - the test reads what the SDK raised
        category = getattr(e, "category", None)
        outcome = {
            "ok": False,
            "type": type(e).__name__,
            "status": getattr(e, "status_code", None),
            "body": getattr(e, "body", None),
            "category": None if category is None else str(category),
            "message": str(e),
        }
    outcome["name"] = name
    outcome["seconds"] = time.monotonic() - start
    return outcome


def errors(spec: dict[str, Any]) -> dict[str, Any]:
    sc = service(spec)
    sampler = sc.create_sampling_client(base_model=spec["model"]).result()
    p = prompt(spec["prompt"])
    small = types.SamplingParams(max_tokens=2, seed=1)
    results = [
        attempt(
            "unknown model_path",
            lambda: sc.create_sampling_client(model_path="tinker://run-1/weights/ckpt-1").result(),
        ),
        attempt(
            "unknown base_model",
            lambda: sc.create_sampling_client(base_model="Qwen/Qwen3-8B").result(),
        ),
        attempt(
            "negative temperature",
            lambda: sampler.sample(p, 1, types.SamplingParams(max_tokens=2, temperature=-1.0)).result(),
        ),
        attempt(
            "token out of vocabulary",
            lambda: sampler.sample(prompt([10**8]), 1, small).result(),
        ),
        attempt(
            "prompt_alt_tokens_k",
            lambda: sampler.sample(p, 1, small, prompt_alt_tokens_k=2).result(),
        ),
        attempt(
            "training client",
            lambda: sc.create_lora_training_client(base_model=spec["model"]).result(),
        ),
        attempt(
            "rest: training runs",
            lambda: tinker.RestClient(base_url=spec["base_url"], api_key=spec["api_key"])
            .list_training_runs()
            .result(),
        ),
        attempt(
            "wrong key",
            lambda: tinker.ServiceClient(base_url=spec["base_url"], api_key="tml-not-the-key")
            .create_sampling_client(base_model=spec["model"])
            .result(),
        ),
        # Still serving after all that.
        attempt("sample after errors", lambda: sampler.sample(p, 1, small).result().sequences[0].tokens),
    ]
    return {"results": results, "http": http_summary()}


def main() -> None:
    mode, path = sys.argv[1], sys.argv[2]
    with open(path) as f:
        spec = json.load(f)
    out = {"parity": parity, "lora": lora, "load": load, "errors": errors}[mode](spec)
    out["tinker_version"] = tinker.__version__
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
