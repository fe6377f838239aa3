#!/usr/bin/env python3
"""Golden outputs of llama.cpp (llama-cpp-python) on GGUF files: the reference for quantized
arithmetic, as transformers is for f32.

Usage: make_llamacpp_goldens.py --gguf FILE --prompts GOLDENS --out JSON
       make_llamacpp_goldens.py --quantize IN OUT TYPE

--quantize writes OUT from IN with llama.cpp's own quantize call (llama_model_quantize, with
requantizing allowed: the shipped file is Q4_1), TYPE one of Q8_0, F16, Q4_K_M, Q4_0.
The golden mode scores the prompts of GOLDENS (the transformers goldens: same names and token ids)
with every position's logits (logits_all) and writes 32 greedy tokens per prompt, in the format of
make_goldens.py. One thread, so the file does not depend on the machine's thread count.
Run with runtimes/py-llamacpp/bin/python (`cargo xtask setup --llama-cpp` builds the pinned
llama-cpp-python there); the goldens also record the tensors' digest (derive_gguf.py).
"""

import argparse
import json
import math
import os
import sys

import llama_cpp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from derive_gguf import tensor_digest  # noqa: E402

GREEDY_TOKENS = 32
SIGNIFICANT_DIGITS = 7

FTYPES = {
    "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "F16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
    "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
}


def rounded(x):
    return float(f"{x:.{SIGNIFICANT_DIGITS}g}")


def quantize(src, dst, kind):
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[kind]
    params.allow_requantize = True
    params.nthread = 0
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0:
        sys.exit(f"llama_model_quantize({src} -> {dst}, {kind}) failed: {rc}")


def log_softmax(row):
    row = np.asarray(row, dtype=np.float64)
    m = row.max()
    return row - (m + math.log(np.exp(row - m).sum()))


def score(llm, tokens):
    llm.reset()
    llm.eval(tokens)
    scores = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    out = [None]
    for i in range(1, len(tokens)):
        out.append(rounded(log_softmax(scores[i - 1])[tokens[i]]))
    return out


def greedy(llm, tokens):
    llm.reset()
    llm.eval(tokens)
    ids, lps, margin = [], [], math.inf
    for _ in range(GREEDY_TOKENS):
        row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        lp = log_softmax(row)
        order = np.argsort(-row, kind="stable")
        best = int(order[0])
        margin = min(margin, float(row[order[0]] - row[order[1]]))
        ids.append(best)
        lps.append(rounded(lp[best]))
        llm.eval([best])
    return ids, lps, margin


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf")
    ap.add_argument("--prompts")
    ap.add_argument("--out")
    ap.add_argument("--quantize", nargs=3, metavar=("IN", "OUT", "TYPE"))
    args = ap.parse_args()
    if args.quantize:
        quantize(*args.quantize)
        return
    with open(args.prompts) as f:
        reference = json.load(f)
    llm = llama_cpp.Llama(
        model_path=args.gguf,
        n_ctx=2048,
        n_batch=2048,
        n_threads=1,
        n_threads_batch=1,
        logits_all=True,
        # An f32 KV cache (llama.cpp's default is f16): the goldens isolate the weights' types.
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        # Plain attention: llama.cpp's CPU flash attention rounds queries to f16.
        flash_attn=False,
        verbose=False,
    )
    cases = []
    for case in reference["cases"]:
        tokens = case["prompt_tokens"]
        ids, lps, margin = greedy(llm, tokens)
        cases.append(
            {
                "name": case["name"],
                "prompt": case["prompt"],
                "prompt_tokens": tokens,
                "prompt_logprobs": score(llm, tokens),
                "greedy_tokens": ids,
                "greedy_text": llm.detokenize(ids).decode("utf-8", errors="replace"),
                "greedy_logprobs": lps,
                "greedy_min_margin": rounded(margin),
            }
        )
        print(f"{case['name']}: {len(tokens)} prompt tokens, greedy margin {margin:.3g}", file=sys.stderr)
    golden = {
        "model": args.gguf.rsplit("/", 1)[-1],
        "generator": f"llama-cpp-python {llama_cpp.__version__} (llama.cpp CPU, 1 thread, logits_all, f32 KV cache, no flash attention)",
        "notes": (
            "Reference outputs of llama.cpp on this GGUF file, for infermux's quantized kernels: "
            "the prompts of the transformers goldens, scored with every position's logits, and 32 "
            "greedy tokens (EOS not special-cased) with the smallest top-1/top-2 logit margin."
        ),
        "checks": {},
        # The tensors llama.cpp ran: a file derived elsewhere must match (conformance checks).
        "tensor_sha256": tensor_digest(args.gguf),
        "cases": cases,
    }
    with open(args.out, "w") as f:
        json.dump(golden, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
