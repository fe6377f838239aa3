"""The peer column of `cargo xtask bench`: the same workload on Hugging Face transformers.

transformers on torch (f32 on the CPU by default; `--device cuda --dtype bf16` on a GPU, where
decode uses a static KV cache, without torch.compile), greedy generation with the workload's token ids (written by
`cargo xtask bench`): single-stream and batched decode (a padded batch `generate`, EOS
ignored), prefill of one long prompt and scoring of a batch of sequences (a forward pass and
log-softmax over all positions), and the process's peak resident memory (VmHWM).

    python xtask/peer_bench.py --model DIR --workload FILE [--threads 2] [--device cuda] [--dtype bf16]

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
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
    args = ap.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    with open(args.workload) as f:
        w = json.load(f)
    start = time.perf_counter()
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    device = torch.device(args.device)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
    model.eval()
    cuda = device.type == "cuda"
    extra = {"cache_implementation": "static"} if cuda else {}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    load_s = time.perf_counter() - start
    pad = model.config.eos_token_id
    if isinstance(pad, list):
        pad = pad[0]

    def generate(prompts, tokens):
        # Left-padded batch (the workload's prompts have one length; padding is a no-op then).
        longest = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p):] = torch.tensor(p)
            mask[i, longest - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                pad_token_id=pad,
                **extra,
            )
        sync()
        secs = time.perf_counter() - start
        assert out.shape[1] == longest + tokens, out.shape
        return secs

    def score(prompts, batch=8):
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(prompts), batch):
                ids = torch.tensor(prompts[i:i + batch], dtype=torch.long, device=device)
                logits = model(input_ids=ids).logits
                logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                logprobs.gather(-1, ids[:, 1:].unsqueeze(-1))
        sync()
        return time.perf_counter() - start

    def best(f):
        return min(f() for _ in range(max(1, w["repeats"])))

    for batch in w["decode_batches"]:  # warm-up: a static cache is allocated per batch size
        generate(w["decode_prompts"][:batch], 2)
    score(w["scoring_prompts"][:1])
    report = {
        "name": "transformers",
        "version": f"transformers {transformers.__version__}, torch {torch.__version__}",
        "dtype": args.dtype,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "load_s": load_s,
    }
    tokens = w["decode_tokens"]
    for batch in w["decode_batches"]:
        prompts = w["decode_prompts"][:batch]
        secs = best(lambda: generate(prompts, tokens))
        report[f"decode_b{batch}_tok_s"] = len(prompts) * tokens / secs
        print(f"transformers: decode b{batch}: {secs:.2f} s", file=sys.stderr)
    prefill = best(lambda: score([w["prefill_prompt"]]))
    report["prefill_tok_s"] = len(w["prefill_prompt"]) / prefill
    report["scoring_s"] = best(lambda: score(w["scoring_prompts"]))
    report["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
