"""The PyTorch trainer of the trainer-agreement test (`crates/api/tests/trainer_agreement.rs`).

tinker-cookbook's sampler-vs-trainer check, made exact: a real trainer (transformers + peft, f32,
eager attention, CPU) takes one optimizer step, saves what it trained, and later scores the
completions infermux sampled from those weights.

  train  --model DIR --out DIR
      One AdamW step of a rank-8 LoRA adapter (q/k/v/o/gate/up/down, PEFT's seeded random init)
      on a few sequences, saved to OUT/adapter (adapter_config.json + adapter_model.safetensors);
      one AdamW step of every base weight on the same sequences, saved to OUT/full
      (model.safetensors, HF layout); the prompts' token ids in OUT/prompts.json.
  score  --jobs FILE --out FILE
      FILE: [{"model": DIR, "adapter": DIR or null, "sequences": [{"prompt": [ids],
      "completion": [ids]}]}]; writes, per job and sequence, the logprob of each completion token
      under those weights.
"""

import argparse
import json
import os

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

SEED = 1234
TEXTS = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "def add(a, b):\n    return a + b\n",
    "Photosynthesis turns light, water and carbon dioxide into sugar.",
    "Once upon a time, a small robot learned to paint the sea.",
]
PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea:",
]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load(model_dir):
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    return model


def batch(tokenizer):
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    return enc, labels


def step(model, params, enc, labels, lr):
    """One AdamW step on the language-modelling loss; returns the loss before it."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    loss = model(**enc, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    model.eval()
    return loss.item()


def train(args):
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc, labels = batch(tokenizer)

    torch.manual_seed(SEED)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
    peft_model = get_peft_model(load(args.model), config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    lora_loss = step(peft_model, trainable, enc, labels, lr=5e-3)
    peft_model.save_pretrained(os.path.join(args.out, "adapter"))

    torch.manual_seed(SEED)
    full = load(args.model)
    full_loss = step(full, list(full.parameters()), enc, labels, lr=1e-4)
    full.save_pretrained(os.path.join(args.out, "full"), safe_serialization=True)

    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    with open(os.path.join(args.out, "prompts.json"), "w") as f:
        json.dump(prompts, f)
    print(json.dumps({"lora_loss": lora_loss, "full_loss": full_loss}))


@torch.no_grad()
def completion_logprobs(model, prompt, completion):
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0].to(torch.float32)
    logprobs = torch.log_softmax(logits, dim=-1)
    start = len(prompt)
    return [float(logprobs[start + i - 1, tok]) for i, tok in enumerate(completion)]


def score(args):
    """Scores every job's sequences; jobs on the same weights share one loaded model (each
    weight set is loaded once, however the jobs interleave)."""
    with open(args.jobs) as f:
        jobs = json.load(f)
    by_weights = {}
    for i, job in enumerate(jobs):
        by_weights.setdefault((job["model"], job.get("adapter")), []).append(i)
    results = [None] * len(jobs)
    for (model_dir, adapter), indices in by_weights.items():
        model = load(model_dir)
        if adapter:
            model = PeftModel.from_pretrained(model, adapter)
            model.eval()
        for i in indices:
            results[i] = [
                completion_logprobs(model, s["prompt"], s["completion"]) for s in jobs[i]["sequences"]
            ]
        del model
    with open(args.out, "w") as f:
        json.dump(results, f)


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--model", required=True)
    t.add_argument("--out", required=True)
    s = sub.add_parser("score")
    s.add_argument("--jobs", required=True)
    s.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    {"train": train, "score": score}[args.cmd](args)


if __name__ == "__main__":
    main()
