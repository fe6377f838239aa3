#!/usr/bin/env python3
"""Generate beam-search golden outputs for infermux from Hugging Face transformers (f32, CPU).

Usage: make_beam_goldens.py --model DIR --out JSON

DIR is the folder `cargo xtask setup` prepared. For each prompt, runs
`model.generate(num_beams=W, num_return_sequences=W, do_sample=False, length_penalty=1.0,
early_stopping=False, max_new_tokens=N)` and records the returned sequences (generated part,
cut after the first EOS, which pads finished beams) best first, with their scores.
Run through `cargo xtask golden`, which provides the pinned Python stack.
"""

import argparse
import json

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

CASES = [
    # (name, prompt, beam_width, max_new_tokens)
    ("capital", "The capital of France is", 3, 12),
    ("story", "Once upon a time, in a small village,", 4, 10),
    ("chat", None, 2, 16),
    ("arithmetic", "12345 + 67890 = ", 3, 8),
]
CHAT_MESSAGES = [{"role": "user", "content": "Name three colors."}]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    cases = []
    for name, text, width, new in CASES:
        if text is None:
            text = tokenizer.apply_chat_template(CHAT_MESSAGES, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text)["input_ids"]
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                num_beams=width,
                num_return_sequences=width,
                do_sample=False,
                length_penalty=1.0,
                early_stopping=False,
                max_new_tokens=new,
                output_scores=True,
                return_dict_in_generate=True,
                top_k=None,
                top_p=None,
                temperature=None,
            )
        sequences = []
        for row in out.sequences.tolist():
            gen = row[len(ids):]
            for i, t in enumerate(gen):
                if t in eos:
                    gen = gen[: i + 1]
                    break
            sequences.append(gen)
        cases.append(
            {
                "name": name,
                "prompt_tokens": ids,
                "beam_width": width,
                "max_new_tokens": new,
                "sequences": sequences,
                "scores": [round(float(s), 6) for s in out.sequences_scores.tolist()],
            }
        )
        print(f"{name}: {[tokenizer.decode(s) for s in sequences]}")
    data = {
        "notes": "transformers beam search (num_beams=W, num_return_sequences=W, greedy, "
        "length_penalty=1.0, early_stopping=False) on the f32 reference folder; sequences are the "
        "generated ids best first, cut after the first EOS; scores are sequences_scores "
        "(sum of logprobs / generated length).",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "cases": cases,
    }
    with open(args.out, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
