#!/usr/bin/env python3
"""Export a Hugging Face Llama-family checkpoint to an ONNX decoder graph (Optimum layout).

The graph is written directly with `onnx.helper` and numpy (no torch, no tracing), in the
layout Optimum uses for "text-generation-with-past":

  inputs   input_ids [batch, seq] int64, attention_mask [batch, past + seq] int64,
           position_ids [batch, seq] int64,
           past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim]
  outputs  logits [batch, seq, vocab], present.{i}.key / .value [batch, kv_heads, past + seq, head_dim]

Supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (q/k/v biases) and
Qwen3ForCausalLM (per-head RMSNorm on q and k). Weights go to one external data file next to the
graph. `--verify GOLDEN_JSON` checks the result with ONNX Runtime against transformers goldens.

Usage: hf_to_onnx.py --model DIR [--out DIR] [--dtype f32|f16] [--verify GOLDEN_JSON] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

EXPORTER_VERSION = "1"
OPSET = 17
MARKER = "infermux_export.json"
GRAPH_FILE = "model.onnx"
DATA_FILE = "model.onnx_data"
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
DTYPES = {"f32": (np.float32, TensorProto.FLOAT), "f16": (np.float16, TensorProto.FLOAT16)}
F32_MIN = float(np.finfo(np.float32).min)
# Optimum's symbolic dimension names.
BATCH, SEQ, PAST = "batch_size", "sequence_length", "past_sequence_length"
TOTAL = f"{PAST} + {SEQ}"


# --- Config and weights ------------------------------------------------------------------------


@dataclass
class Spec:
    arch: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_positions: int
    tied: bool
    qk_norm: bool
    windows: list  # per layer: sliding window size, or None for full attention


def load_spec(model_dir: Path) -> Spec:
    cfg = json.loads((model_dir / "config.json").read_text())
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        sys.exit(f"unsupported architectures {archs}; expected one of {ARCHITECTURES}")
    heads = cfg["num_attention_heads"]
    rope_params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or rope_params or None
    theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    layers = cfg["num_hidden_layers"]
    window = cfg.get("sliding_window")
    if arch.startswith("Qwen") and not cfg.get("use_sliding_window", False):
        window = None
    if window and cfg.get("layer_types"):
        windows = [window if t == "sliding_attention" else None for t in cfg["layer_types"]]
    elif window and arch.startswith("Qwen"):
        windows = [window if i >= cfg.get("max_window_layers", 0) else None for i in range(layers)]
    else:
        windows = [window or None] * layers
    return Spec(
        arch=arch,
        layers=layers,
        hidden=cfg["hidden_size"],
        heads=heads,
        kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        vocab=cfg["vocab_size"],
        eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        rope_scaling=scaling,
        max_positions=int(cfg.get("max_position_embeddings", 4096)),
        tied=bool(cfg.get("tie_word_embeddings", False)),
        qk_norm=arch == "Qwen3ForCausalLM",
        windows=windows,
    )


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    files = [single] if single.is_file() else sorted(model_dir.glob("*.safetensors"))
    if not files:
        sys.exit(f"no safetensors files in {model_dir}")
    return files


class Weights:
    """Lazy access to the tensors of one or more safetensors shards, as float32 numpy arrays."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self._handles = [safe_open(str(f), framework="np") for f in files]
        self._where = {k: h for h in self._handles for k in h.keys()}  # noqa: SIM118 (a handle is not iterable)

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            sys.exit(f"missing tensor {name}")
        return np.asarray(self._where[name].get_tensor(name)).astype(np.float32, copy=False)


def rope_tables(spec: Spec) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_positions, head_dim] in float32, computed as transformers does."""
    hd = spec.head_dim
    exponent = np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)
    inv_freq = np.float32(1.0) / (np.float64(spec.rope_theta) ** exponent).astype(np.float32)
    scaling = spec.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / np.float32(scaling["factor"])
    elif kind == "llama3":
        factor, low, high = (float(scaling[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = np.float32(2 * math.pi) / inv_freq
        scaled = np.where(wavelen > old_ctx / low, inv_freq / np.float32(factor), inv_freq)
        smooth = ((old_ctx / wavelen - low) / (high - low)).astype(np.float32)
        smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
        medium = ~(wavelen < old_ctx / high) & ~(wavelen > old_ctx / low)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    elif kind != "default":
        sys.exit(f"unsupported rope_scaling type {kind!r}")
    positions = np.arange(spec.max_positions, dtype=np.float32)
    angles = positions[:, None] * inv_freq[None, :]  # float32 product, as transformers
    emb = np.concatenate([angles, angles], axis=-1).astype(np.float64)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


# --- Graph building ----------------------------------------------------------------------------


class Graph:
    """Collects nodes and initializers; `op` returns the output name(s) of the added node."""

    def __init__(self, dtype: str, weights: Weights):
        self.np_dtype, self.onnx_dtype = DTYPES[dtype]
        self.f16 = dtype == "f16"
        self.w = weights
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self._consts: dict[tuple, str] = {}
        self._count = 0

    def op(self, op_type: str, inputs: list[str], name: str, outputs=None, n_out=1, **attrs):
        self._count += 1
        if outputs is None:
            outputs = [f"{name}/{op_type}_{self._count}" + (f":{k}" if n_out > 1 else "") for k in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=f"{name}/{op_type}_{self._count}", **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def weight(self, name: str, transpose: bool = False) -> str:
        """An HF tensor as an initializer in the model dtype (optionally transposed to [in, out])."""
        array = self.w.get(name)
        if transpose:
            array, name = array.T, name + ".T"
        return self.init(name, array.astype(self.np_dtype))

    def const(self, value, dtype=np.int64) -> str:
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(f"const_{len(self._consts)}", array)
        return self._consts[key]

    def fconst(self, value) -> str:
        return self.const(value, self.np_dtype)

    def to_f32(self, x: str, name: str) -> str:
        return self.op("Cast", [x], name, to=TensorProto.FLOAT) if self.f16 else x

    def from_f32(self, x: str, name: str) -> str:
        return self.op("Cast", [x], name, to=self.onnx_dtype) if self.f16 else x


def linear(g: Graph, x: str, prefix: str) -> str:
    """x @ W^T (+ b) for the HF Linear `prefix` (bias used when the checkpoint has one)."""
    y = g.op("MatMul", [x, g.weight(f"{prefix}.weight", transpose=True)], prefix)
    if g.w.has(f"{prefix}.bias"):
        y = g.op("Add", [y, g.weight(f"{prefix}.bias")], prefix)
    return y


def embed(g: Graph) -> str:
    return g.op("Gather", [g.weight("model.embed_tokens.weight"), "input_ids"], "model.embed_tokens", axis=0)


def rmsnorm(g: Graph, x: str, weight: str, eps: float) -> str:
    """weight * (x / sqrt(mean(x^2) + eps)), the normalisation in float32."""
    name = weight.removesuffix(".weight")
    xf = g.to_f32(x, name)
    sq = g.op("Pow", [xf, g.const(2.0, np.float32)], name)
    mean = g.op("ReduceMean", [sq], name, axes=[-1], keepdims=1)
    std = g.op("Sqrt", [g.op("Add", [mean, g.const(eps, np.float32)], name)], name)
    y = g.from_f32(g.op("Div", [xf, std], name), name)
    return g.op("Mul", [g.weight(weight), y], name)


def rope(g: Graph, spec: Spec) -> tuple[str, str]:
    """cos and signed sin [batch, 1, seq, head_dim] gathered at position_ids.

    The sign of rotate_half is folded into the sin table: rotate_half(x) * sin equals
    cat(x2, x1) * cat(-sin1, sin2) exactly, so applying RoPE needs no Neg.
    """
    cos, sin = rope_tables(spec)
    half = spec.head_dim // 2
    sin = np.concatenate([-sin[:, :half], sin[:, half:]], axis=-1)
    out = []
    for label, table in (("cos", cos), ("sin", sin)):
        t = g.init(f"rotary.{label}_table", table.astype(g.np_dtype))
        gathered = g.op("Gather", [t, "position_ids"], f"rotary/{label}", axis=0)
        out.append(g.op("Unsqueeze", [gathered, g.const([1])], f"rotary/{label}"))
    return out[0], out[1]


def apply_rope(g: Graph, x: str, cos: str, sin_signed: str, head_dim: int, name: str) -> str:
    half = head_dim // 2
    x1, x2 = g.op("Split", [x, g.const([half, half])], name, n_out=2, axis=-1)
    rotated = g.op("Concat", [x2, x1], name, axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos], name), g.op("Mul", [rotated, sin_signed], name)], name)


def attention_masks(g: Graph, windows: set) -> dict:
    """Boolean [batch, 1, seq, total] per sliding window (None: full attention).

    Key i is visible to query j iff attention_mask[b, i] == 1 and i <= past + j (and, with a
    window, past + j - i < window).
    """
    name = "attn_mask"
    seq = g.op("Gather", [g.op("Shape", ["input_ids"], name), g.const(1)], name, axis=0)
    total = g.op("Gather", [g.op("Shape", ["attention_mask"], name), g.const(1)], name, axis=0)
    past = g.op("Sub", [total, seq], name)
    kpos = g.op("Unsqueeze", [g.op("Range", [g.const(0), total, g.const(1)], name), g.const([0])], name)
    qpos = g.op("Unsqueeze", [g.op("Range", [past, total, g.const(1)], name), g.const([1])], name)
    causal = g.op("LessOrEqual", [kpos, qpos], name)  # [seq, total]
    pad = g.op("Cast", ["attention_mask"], name, to=TensorProto.BOOL)
    pad = g.op("Unsqueeze", [pad, g.const([1, 2])], name)  # [batch, 1, 1, total]
    masks = {}
    for window in windows:
        allowed = causal
        if window:
            near = g.op("Less", [g.op("Sub", [qpos, kpos], name), g.const(window)], name)
            allowed = g.op("And", [allowed, near], name)
        masks[window] = g.op("And", [pad, allowed], name)
    return masks


def split_heads(g: Graph, x: str, n: int, hd: int, name: str, norm: str | None, eps: float) -> str:
    """[batch, seq, n*hd] -> [batch, n, seq, hd], with the optional per-head RMSNorm (Qwen3)."""
    x = g.op("Reshape", [x, g.const([0, 0, n, hd])], name)
    if norm is not None:
        x = rmsnorm(g, x, norm, eps)
    return g.op("Transpose", [x], name, perm=[0, 2, 1, 3])


def attention(g: Graph, spec: Spec, i: int, x: str, cos: str, sin: str, allowed: str) -> str:
    p = f"model.layers.{i}.self_attn"
    nh, nkv, hd = spec.heads, spec.kv_heads, spec.head_dim
    qn, kn = (f"{p}.q_norm.weight", f"{p}.k_norm.weight") if spec.qk_norm else (None, None)
    q = split_heads(g, linear(g, x, f"{p}.q_proj"), nh, hd, f"{p}/q", qn, spec.eps)
    k = split_heads(g, linear(g, x, f"{p}.k_proj"), nkv, hd, f"{p}/k", kn, spec.eps)
    v = split_heads(g, linear(g, x, f"{p}.v_proj"), nkv, hd, f"{p}/v", None, spec.eps)
    q = apply_rope(g, q, cos, sin, hd, f"{p}/q_rope")
    k = apply_rope(g, k, cos, sin, hd, f"{p}/k_rope")
    k = g.op("Concat", [f"past_key_values.{i}.key", k], p, outputs=[f"present.{i}.key"], axis=2)
    v = g.op("Concat", [f"past_key_values.{i}.value", v], p, outputs=[f"present.{i}.value"], axis=2)
    # GQA without repeating K/V: the n_rep query heads sharing a kv head become extra rows.
    grouped = nh != nkv
    if grouped:
        q = g.op("Reshape", [q, g.const([0, nkv, -1, hd])], p)
    kt = g.op("Transpose", [k], p, perm=[0, 1, 3, 2])
    scores = g.op("Mul", [g.op("MatMul", [q, kt], p), g.fconst(hd**-0.5)], p)
    if grouped:
        scores = g.op("Reshape", [scores, g.const([0, nh, -1, 0])], p)
    scores = g.op("Where", [allowed, g.to_f32(scores, p), g.const(F32_MIN, np.float32)], p)
    probs = g.from_f32(g.op("Softmax", [scores], p, axis=-1), p)
    if grouped:
        probs = g.op("Reshape", [probs, g.const([0, nkv, -1, 0])], p)
    ctx = g.op("MatMul", [probs, v], p)
    if grouped:
        ctx = g.op("Reshape", [ctx, g.const([0, nh, -1, hd])], p)
    ctx = g.op("Transpose", [ctx], p, perm=[0, 2, 1, 3])
    ctx = g.op("Reshape", [ctx, g.const([0, 0, nh * hd])], p)
    return linear(g, ctx, f"{p}.o_proj")


def mlp(g: Graph, i: int, x: str) -> str:
    p = f"model.layers.{i}.mlp"
    gate = linear(g, x, f"{p}.gate_proj")
    act = g.op("Mul", [gate, g.op("Sigmoid", [gate], p)], p)  # SiLU
    return linear(g, g.op("Mul", [act, linear(g, x, f"{p}.up_proj")], p), f"{p}.down_proj")


def layer(g: Graph, spec: Spec, i: int, h: str, cos: str, sin: str, allowed: str) -> str:
    p = f"model.layers.{i}"
    a = attention(g, spec, i, rmsnorm(g, h, f"{p}.input_layernorm.weight", spec.eps), cos, sin, allowed)
    h = g.op("Add", [h, a], p)
    m = mlp(g, i, rmsnorm(g, h, f"{p}.post_attention_layernorm.weight", spec.eps))
    return g.op("Add", [h, m], p)


def head(g: Graph, spec: Spec, h: str) -> str:
    """Final norm and lm_head as Gemm(transB=1), so a tied embedding is stored once."""
    h = rmsnorm(g, h, "model.norm.weight", spec.eps)
    tied = spec.tied or not g.w.has("lm_head.weight")
    table = "model.embed_tokens.weight" if tied else g.weight("lm_head.weight")
    flat = g.op("Reshape", [h, g.const([-1, spec.hidden])], "lm_head")
    logits = g.op("Gemm", [flat, table], "lm_head", transB=1)
    shape = g.op("Concat", [g.op("Shape", ["input_ids"], "lm_head"), g.const([spec.vocab])], "lm_head", axis=0)
    return g.op("Reshape", [logits, shape], "lm_head", outputs=["logits"])


def build_model(spec: Spec, weights: Weights, dtype: str) -> onnx.ModelProto:
    g = Graph(dtype, weights)
    h = embed(g)
    cos, sin = rope(g, spec)
    masks = attention_masks(g, set(spec.windows))
    for i in range(spec.layers):
        h = layer(g, spec, i, h, cos, sin, masks[spec.windows[i]])
    head(g, spec, h)

    def value(name, dtype, shape):
        return helper.make_tensor_value_info(name, dtype, shape)

    ids = TensorProto.INT64
    inputs = [value("input_ids", ids, [BATCH, SEQ]), value("attention_mask", ids, [BATCH, TOTAL])]
    inputs.append(value("position_ids", ids, [BATCH, SEQ]))
    outputs = [value("logits", g.onnx_dtype, [BATCH, SEQ, spec.vocab])]
    for i in range(spec.layers):
        for part in ("key", "value"):
            for io, name, length in ((inputs, f"past_key_values.{i}", PAST), (outputs, f"present.{i}", TOTAL)):
                io.append(value(f"{name}.{part}", g.onnx_dtype, [BATCH, spec.kv_heads, length, spec.head_dim]))
    graph = helper.make_graph(g.nodes, f"infermux_{spec.arch}", inputs, outputs, initializer=g.inits)
    opsets = [helper.make_opsetid("", OPSET)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="infermux-hf_to_onnx")
    # The lowest IR version for the opset, not onnx's newest (ONNX Runtime rejects IR versions it predates).
    model.ir_version = helper.find_min_ir_version_for(opsets)
    model.producer_version = EXPORTER_VERSION
    return model


# --- Export (temp folder, marker, atomic rename) -----------------------------------------------


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def marker_for(model_dir: Path, dtype: str) -> dict:
    files = weight_files(model_dir)
    return {
        "exporter_version": EXPORTER_VERSION,
        "exporter_sha256": sha256_file(Path(__file__)),
        "opset": OPSET,
        "dtype": dtype,
        "config_sha256": sha256_file(model_dir / "config.json"),
        "weights": {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files},
    }


def is_current(out: Path, marker: dict) -> bool:
    try:
        current = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return current == marker and (out / GRAPH_FILE).is_file() and (out / DATA_FILE).is_file()


def default_out(model_dir: Path, dtype: str) -> Path:
    return model_dir / ("onnx" if dtype == "f32" else f"onnx-{dtype}")


def export(model_dir: Path, out: Path, dtype: str, force: bool = False) -> Path:
    marker = marker_for(model_dir, dtype)
    if not force and is_current(out, marker):
        print(f"onnx export up to date: {out}", file=sys.stderr)
        return out
    start = time.time()
    spec = load_spec(model_dir)
    model = build_model(spec, Weights(weight_files(model_dir)), dtype)
    tmp = out.parent / f".{out.name}.partial"
    old = out.parent / f".{out.name}.old"
    for d in (tmp, old):
        shutil.rmtree(d, ignore_errors=True)
    tmp.mkdir(parents=True)
    onnx.save_model(
        model,
        str(tmp / GRAPH_FILE),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=DATA_FILE,
        size_threshold=1024,
    )
    del model
    onnx.checker.check_model(str(tmp / GRAPH_FILE), full_check=True)
    (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    for f in (GRAPH_FILE, DATA_FILE):
        (out / f).chmod(0o644)  # onnx writes the data file 0600
    shutil.rmtree(old, ignore_errors=True)
    sizes = ", ".join(f"{f} {(out / f).stat().st_size / 2**20:.1f} MiB" for f in (GRAPH_FILE, DATA_FILE))
    print(f"exported {spec.arch} ({dtype}) to {out} in {time.time() - start:.1f}s: {sizes}", file=sys.stderr)
    return out


# --- Verification with ONNX Runtime ------------------------------------------------------------


class Runner:
    """Runs the exported graph step by step, carrying present -> past."""

    def __init__(self, path: Path):
        import onnxruntime as ort

        self.sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        past = [i for i in self.sess.get_inputs() if i.name.startswith("past_key_values.")]
        self.past_names = [i.name for i in past]
        self.dtype = np.float16 if "float16" in past[0].type else np.float32
        self.kv_heads, self.head_dim = past[0].shape[1], past[0].shape[3]
        self.output_names = [o.name for o in self.sess.get_outputs()]

    def empty_past(self, batch: int) -> dict:
        return {n: np.zeros((batch, self.kv_heads, 0, self.head_dim), self.dtype) for n in self.past_names}

    def step(self, ids, mask, positions, past):
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **past}
        result = dict(zip(self.output_names, self.sess.run(None, feed)))
        present = {n: result[n.replace("past_key_values.", "present.")] for n in self.past_names}
        return result["logits"].astype(np.float32), present

    def prefill(self, tokens: list[int]):
        ids = np.array([tokens], np.int64)
        return self.step(ids, np.ones_like(ids), np.arange(len(tokens), dtype=np.int64)[None], self.empty_past(1))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def prompt_logprobs(runner: Runner, tokens: list[int]) -> np.ndarray:
    logits, _ = runner.prefill(tokens)
    lp = log_softmax(logits[0, :-1])
    return lp[np.arange(len(tokens) - 1), tokens[1:]]


def greedy(runner: Runner, tokens: list[int], steps: int):
    """Greedy decode: the tokens, each step's logits (prefill's last row first), prefill's logits."""
    prefill, past = runner.prefill(tokens)
    rows, out = [prefill[0, -1]], []
    for s in range(steps):
        out.append(int(np.argmax(rows[-1])))
        if s == steps - 1:
            break
        pos = len(tokens) + s
        ids = np.array([[out[-1]]], np.int64)
        mask = np.ones((1, pos + 1), np.int64)
        logits, past = runner.step(ids, mask, np.array([[pos]], np.int64), past)
        rows.append(logits[0, -1])
    return out, rows, prefill[0]


def check_goldens(runner: Runner, cases: list[dict]) -> tuple[bool, dict]:
    ok, worst, worst_greedy = True, 0.0, 0.0
    f32_logprobs = {}
    for case in cases:
        tokens = case["prompt_tokens"]
        lp = prompt_logprobs(runner, tokens)
        f32_logprobs[case["name"]] = lp
        delta = float(np.abs(lp - np.array(case["prompt_logprobs"][1:], np.float64)).max())
        worst = max(worst, delta)
        got, rows, _ = greedy(runner, tokens, len(case["greedy_tokens"]))
        match = got == case["greedy_tokens"]
        glp = np.array([log_softmax(r)[t] for r, t in zip(rows, got)])
        gdelta = float(np.abs(glp - np.array(case["greedy_logprobs"])).max()) if match else float("nan")
        worst_greedy = max(worst_greedy, gdelta) if match else worst_greedy
        status = "ok" if delta <= 1e-3 and match else "FAIL"
        ok &= status == "ok"
        greedy_status = f"match (decode max|Δlogprob| {gdelta:.2e})" if match else "MISMATCH"
        print(
            f"  [{status}] {case['name']:<12} {len(tokens):4d} tokens  max|Δlogprob| {delta:.2e}  greedy {greedy_status}"
        )
    print(f"check 2: prompt logprobs max|Δ| {worst:.3e} (limit 1e-3), greedy decode max|Δ| {worst_greedy:.3e}")
    return ok, f32_logprobs


def check_batched(runner: Runner, a: list[int], b: list[int], steps: int = 8) -> bool:
    """Left-pads the shorter prompt; batched prefill + decode must match the unbatched runs."""
    singles = [greedy(runner, t, steps + 1) for t in (a, b)]
    width = max(len(a), len(b))
    pads = [width - len(t) for t in (a, b)]
    ids = np.array([[0] * p + t for p, t in zip(pads, (a, b))], np.int64)
    mask = np.array([[0] * p + [1] * len(t) for p, t in zip(pads, (a, b))], np.int64)
    pos = np.array([[1] * p + list(range(len(t))) for p, t in zip(pads, (a, b))], np.int64)
    logits, past = runner.step(ids, mask, pos, runner.empty_past(2))
    worst = max(float(np.abs(logits[r, pads[r] :] - singles[r][2]).max()) for r in range(2))
    for s in range(steps):
        ids = np.array([[singles[r][0][s]] for r in range(2)], np.int64)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        pos = np.array([[len(t) + s] for t in (a, b)], np.int64)
        logits, past = runner.step(ids, mask, pos, past)
        worst = max(worst, max(float(np.abs(logits[r, 0] - singles[r][1][s + 1]).max()) for r in range(2)))
    ok = worst <= 1e-4
    what = f"lengths {len(a)} and {len(b)}, left padding, prefill + {steps} decode steps"
    print(f"check 3: batched ({what}) max|Δlogits| {worst:.3e} (limit 1e-4) {'ok' if ok else 'FAIL'}")
    return ok


def check_f16(path: Path, cases: list[dict], f32_logprobs: dict) -> bool:
    runner = Runner(path)
    worst, total, count, agree = 0.0, 0.0, 0, 0
    for case in cases:
        delta = np.abs(prompt_logprobs(runner, case["prompt_tokens"]) - f32_logprobs[case["name"]])
        worst, total, count = max(worst, float(delta.max())), total + float(delta.sum()), count + delta.size
        agree += greedy(runner, case["prompt_tokens"], 8)[0] == case["greedy_tokens"][:8]
    ok = worst <= 0.1
    print(
        f"check 4: f16 vs f32 prompt logprobs max|Δ| {worst:.3e} mean|Δ| {total / count:.3e} (limit 0.1) "
        f"{'ok' if ok else 'FAIL'}; first 8 greedy tokens equal on {agree}/{len(cases)} prompts"
    )
    return ok


def verify(f32_dir: Path, f16_dir: Path, golden: Path) -> bool:
    start = time.time()
    cases = json.loads(golden.read_text())["cases"]
    runner = Runner(f32_dir / GRAPH_FILE)
    ok, f32_logprobs = check_goldens(runner, cases)
    by_len = sorted(cases, key=lambda c: len(c["prompt_tokens"]))
    ok &= check_batched(runner, by_len[0]["prompt_tokens"], by_len[len(by_len) // 2]["prompt_tokens"])
    ok &= check_f16(f16_dir / GRAPH_FILE, cases, f32_logprobs)
    print(f"verify {'passed' if ok else 'FAILED'} in {time.time() - start:.1f}s")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="Hugging Face model folder")
    ap.add_argument("--out", type=Path, help="output folder (default: MODEL/onnx, MODEL/onnx-f16 for f16)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
    ap.add_argument("--verify", type=Path, metavar="GOLDEN_JSON", help="check against transformers goldens")
    ap.add_argument("--force", action="store_true", help="export even when the marker is current")
    args = ap.parse_args()
    model_dir = args.model.resolve()
    out = (args.out or default_out(model_dir, args.dtype)).resolve()
    export(model_dir, out, args.dtype, args.force)
    if args.verify is None:
        return 0
    dirs = {d: out if d == args.dtype else default_out(model_dir, d) for d in DTYPES}
    for d, path in dirs.items():
        if d != args.dtype:
            export(model_dir, path, d)
    return 0 if verify(dirs["f32"], dirs["f16"], args.verify) else 1


if __name__ == "__main__":
    sys.exit(main())
