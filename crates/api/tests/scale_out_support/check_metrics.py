"""Strict check of a Prometheus text exposition (stdin), in place of `promtool check metrics`.

Parses with prometheus_client's text parser (a malformed line raises), then lints what promtool
lints and more: every family has HELP and a known TYPE, counters' samples end in `_total`,
no sample (name + labels) appears twice, histogram buckets are cumulative with a `+Inf` bucket
equal to `_count`. Prints every sample as JSON (`[name, labels, value]`) on success; exits 1
naming each problem otherwise.
"""

import json
import math
import sys
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

KNOWN_TYPES = {"counter", "gauge", "histogram", "summary", "info", "stateset", "gaugehistogram"}


def main() -> int:
    text = sys.stdin.read()
    problems = []
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as e:  # the parser raises ValueError (and others) on a malformed line
        print(f"unparsable exposition: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if not families:
        problems.append("no metric families")
    seen_families = set()
    seen_samples = set()
    out = []
    for fam in families:
        if fam.name in seen_families:
            problems.append(f"{fam.name}: family appears twice")
        seen_families.add(fam.name)
        if not fam.documentation:
            problems.append(f"{fam.name}: no HELP")
        if fam.type not in KNOWN_TYPES:
            problems.append(f"{fam.name}: TYPE {fam.type!r}")
        buckets = defaultdict(list)
        counts = {}
        for s in fam.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            if key in seen_samples:
                problems.append(f"{s.name}{s.labels}: sample appears twice")
            seen_samples.add(key)
            if math.isnan(s.value):
                problems.append(f"{s.name}{s.labels}: NaN")
            if fam.type == "counter" and not s.name.endswith(("_total", "_created")):
                problems.append(f"{s.name}: counter sample without _total")
            if fam.type == "counter" and s.name.endswith("_total") and s.value < 0:
                problems.append(f"{s.name}{s.labels}: negative counter")
            if fam.type == "histogram":
                rest = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
                if s.name.endswith("_bucket"):
                    buckets[rest].append((float(s.labels["le"]), s.value))
                elif s.name.endswith("_count"):
                    counts[rest] = s.value
            out.append([s.name, s.labels, s.value])
        for rest, bs in buckets.items():
            bs.sort()
            if any(b[1] > c[1] for b, c in zip(bs, bs[1:])):
                problems.append(f"{fam.name}{dict(rest)}: buckets not cumulative")
            if not bs or bs[-1][0] != math.inf:
                problems.append(f"{fam.name}{dict(rest)}: no +Inf bucket")
            elif counts.get(rest) != bs[-1][1]:
                problems.append(f"{fam.name}{dict(rest)}: +Inf bucket != _count")
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
