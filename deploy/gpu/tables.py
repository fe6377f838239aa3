"""Markdown table of a bench JSON-lines file: each backend's figures and their ratio to the
transformers peer of the same dtype, measured in the same run.

    python tables.py bench.jsonl MODEL DEVICE > bench.md
"""

import json
import sys

# key, label, whether lower is better; decode columns come first, one per batch in the file.
METRICS = [("prefill_tok_s", "prefill tok/s", False), ("scoring_s", "scoring s", True), ("load_s", "load s", True)]


def main():
    path, model, device = sys.argv[1:4]
    rows = [json.loads(line) for line in open(path) if line.strip()]
    batches = sorted({int(k[len("decode_b"):-len("_tok_s")]) for r in rows for k in r
                      if k.startswith("decode_b") and k.endswith("_tok_s")})
    decode = [(f"decode_b{b}_tok_s", f"decode b{b} tok/s", False) for b in batches]
    metrics = decode + [m for m in METRICS if any(m[0] in r for r in rows)]
    peers = {r["dtype"]: r for r in rows if r["name"] == "transformers"}
    print(f"### {model} on {device} (ratio to transformers, same dtype, same run; > 1 is better)\n")
    print("| runtime | dtype | " + " | ".join(label for _, label, _ in metrics) + " |")
    print("|---|---|" + "---|" * len(metrics))
    for r in rows:
        peer = peers.get(r["dtype"])
        cells = []
        for key, _, lower in metrics:
            v = r.get(key)
            if v is None:
                cells.append("–")
                continue
            cell = f"{v:.3g}"
            if peer and r is not peer and peer.get(key):
                ratio = peer[key] / v if lower else v / peer[key]
                cell += f" ({ratio:.2f}×)"
            cells.append(cell)
        print(f"| {r['name']} | {r['dtype']} | " + " | ".join(cells) + " |")
    print()


if __name__ == "__main__":
    main()
