"""The llama.cpp peer of `cargo xtask bench --gguf`: the same workload on llama.cpp
(llama-cpp-python) on the same GGUF file, with the same thread count.

Greedy decode of one stream (the prompt evaluated, then one token per llama_decode, EOS never
checked), prefill of one long prompt with every position's logits (as infermux's scoring
computes them), scoring of the workload's sequences one after another, and the process's peak
resident memory (VmHWM). Batched decode is left out: llama-cpp-python runs one sequence.
The KV cache is f32 and flash attention off, as in the goldens (make_llamacpp_goldens.py).

    python xtask/peer_llamacpp.py --model FILE.gguf --workload FILE [--threads 2]

Prints one JSON object with the keys of the Rust side (`tests/src/bin/infermux-bench.rs`).
"""

import argparse
import json
import sys
import time


def peak_rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--workload", required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import llama_cpp
    import numpy as np

    with open(args.workload) as f:
        w = json.load(f)
    longest = max(
        [len(w["prefill_prompt"])]
        + [len(p) for p in w["scoring_prompts"]]
        + [len(p) + w["decode_tokens"] for p in w["decode_prompts"]]
    )
    start = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=args.model,
        n_ctx=longest + 8,
        n_batch=longest + 8,
        n_ubatch=longest + 8,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        logits_all=True,
        flash_attn=False,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        verbose=False,
    )
    load_s = time.perf_counter() - start

    def decode(prompt, tokens):
        start = time.perf_counter()
        llm.reset()
        llm.eval(prompt)
        for _ in range(tokens):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        return time.perf_counter() - start

    def score(prompts):
        start = time.perf_counter()
        for p in prompts:
            llm.reset()
            llm.eval(p)
        return time.perf_counter() - start

    def best(f):
        return min(f() for _ in range(max(1, w["repeats"])))

    decode(w["decode_prompts"][0], 2)  # warm-up
    score(w["scoring_prompts"][:1])
    report = {
        "name": "llama.cpp",
        "version": f"llama-cpp-python {llama_cpp.__version__}",
        "dtype": "gguf",
        "device": "cpu",
        "threads": args.threads,
        "load_s": load_s,
    }
    tokens = w["decode_tokens"]
    secs = best(lambda: decode(w["decode_prompts"][0], tokens))
    report["decode_b1_tok_s"] = tokens / secs
    print(f"llama.cpp: decode b1: {secs:.2f} s", file=sys.stderr)
    prefill = best(lambda: score([w["prefill_prompt"]]))
    report["prefill_tok_s"] = len(w["prefill_prompt"]) / prefill
    report["scoring_s"] = best(lambda: score(w["scoring_prompts"]))
    report["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
