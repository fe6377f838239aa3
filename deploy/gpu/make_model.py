"""Seeded random-weight model of a config, made with this machine's torch, and its goldens.

The GPU machines cannot receive the reference model's 538 MB of weights, so the bundle carries
configs and the tokenizer and makes same-shape weights there: matrices N(0, (GAIN / sqrt(fan_in))^2)
(activations stay O(1) through the layers, so distributions are peaked and greedy steps have
clear margins), embeddings N(0, EMBED_STD^2), norm weights 1 + N(0, NORM_NOISE^2), biases
N(0, BIAS_STD^2), drawn from one torch.Generator seeded with --seed over the parameters in name
order, saved with save_pretrained in float32. With --goldens, the goldens of tests/data/goldens
(same prompts as the SmolLM2 goldens, same fields) from transformers in float32 with eager
attention on --device.

    python make_model.py --config DIR --tokenizer DIR --out DIR [--device cuda] [--goldens FILE]
"""

import argparse
import os
import shutil
import sys

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import make_goldens as mg

GAIN = 1.5
EMBED_STD = 0.25
NORM_NOISE = 0.2
BIAS_STD = 0.1
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]


def build(config_dir, tokenizer_dir, out, seed):
    config = AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(seed)
    with torch.no_grad():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        mg.randomize(model, seed, weight_std=lambda p: GAIN / p.shape[-1] ** 0.5,
                     embed_std=EMBED_STD, bias_std=BIAS_STD, norm_noise=NORM_NOISE)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        src = os.path.join(tokenizer_dir, name)
        if os.path.exists(src):
            shutil.copy(src, os.path.join(out, name))
    params = sum(p.numel() for p in model.parameters())
    print(f"made {type(model).__name__} with {params / 1e6:.0f}M parameters in {out}", file=sys.stderr)


def goldens(folder, device, path, seed):
    torch.set_grad_enabled(False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = mg.load_model(folder).to(device)
    cases = []
    for name, text in mg.build_prompts(tokenizer):
        cases.append(mg.make_case(model, tokenizer, name, text))
        c = cases[-1]
        print(f"  {name}: {len(c['prompt_tokens'])} prompt tokens, min margin {c['greedy_min_margin']:.3g}",
              file=sys.stderr)
    mg.write_json(path, {
        "model": f"random-weight {type(model).__name__} (seed {seed}) of {os.path.basename(folder)}",
        "generator": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "dtype": "float32",
            "device": str(device),
            "attn_implementation": "eager",
        },
        "notes": __doc__.strip().split("\n\n")[1],
        "cases": cases,
    })
    print(f"wrote {len(cases)} cases to {path}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="folder with config.json")
    ap.add_argument("--tokenizer", required=True, help="folder with tokenizer.json and friends")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--goldens", help="write the goldens here")
    args = ap.parse_args()
    build(args.config, args.tokenizer, args.out, args.seed)
    if args.goldens:
        goldens(args.out, torch.device(args.device), args.goldens, args.seed)


if __name__ == "__main__":
    main()
