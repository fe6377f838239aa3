//! [`LlamaOps`] for the exporter: each op of [`Llama::forward`](infermux_core::model::Llama)
//! appends the ONNX nodes that compute it, over symbolic values, so the graph is the one Rust
//! model definition recorded once for every batch shape.
//!
//! The batch is the graph's: `input_ids [batch, seq]`, `attention_mask [batch, past + seq]`,
//! `position_ids [batch, seq]` and `past_key_values.N.* [batch, kv_heads, past, head_dim]`
//! (Optimum's "text-generation-with-past"). A row of the op set is one `[batch, seq]` position:
//! values are `[batch, seq, width]`, or `[batch, seq, width / head_dim, head_dim]` after an op
//! that works per head (per-head RMSNorm, RoPE), kept in that layout until an op needs rows so
//! that q/k norm → RoPE → attention reshape once. Semantics (those of the earlier Python export
//! and of transformers' eager attention):
//!
//! - RMSNorm runs in f32 (`Pow`, `ReduceMean`, `Add` ε, `Sqrt`, `Div`), then casts back and
//!   multiplies by the weight.
//! - RoPE gathers `cos` and a signed `sin` (`[-sin | sin]`, so `rotate_half` needs no `Neg`) from
//!   [`ModelConfig::rope_tables`] at `position_ids`.
//! - Attention concatenates the past and the new keys/values into `present.N.*`, scores
//!   `q·kᵀ × scale` with the query heads of one KV head stacked as extra rows (no KV repeat),
//!   masks with `Where` (key `i` is visible to query `j` iff `attention_mask[b, i] = 1` and
//!   `i ≤ past + j`: left padding and causality in one boolean, built once), and takes the
//!   softmax in f32. A fully masked row (a padding query) gets a uniform softmax, never NaN.
//! - `logit_rows` is the identity: the graph returns every position's logits, as Optimum's does.

use infermux_core::model::{AttentionShape, LlamaOps, ModelConfig};

use super::ExportError;
use super::graph::{Graph, Source, int, ints};
use super::loader::{Embedding, Linear, Vector};
use super::proto::ElemType;

/// A symbolic activation: its value name, row width, and layout.
#[derive(Debug, Clone)]
pub(crate) struct Value {
    pub name: String,
    pub width: usize,
    /// `Some(d)`: laid out `[batch, seq, width / d, d]`; `None`: `[batch, seq, width]`.
    pub head_dim: Option<usize>,
}

/// Records the forward pass as nodes of `graph`.
pub(crate) struct Recorder<'a> {
    graph: &'a mut Graph,
    config: &'a ModelConfig,
    /// Scope of the current decoder layer (`model.layers.N`), for node names.
    layer: String,
    /// `cos` and signed `sin` gathered at `position_ids`, `[batch, seq, 1, head_dim]`.
    rope: Option<(usize, String, String)>,
    /// The boolean attention mask `[batch, 1, seq, past + seq]`.
    mask: Option<String>,
}

fn bad(reason: String) -> ExportError {
    ExportError::Graph(reason)
}

impl<'a> Recorder<'a> {
    pub fn new(graph: &'a mut Graph, config: &'a ModelConfig) -> Self {
        Self {
            graph,
            config,
            layer: "model".into(),
            rope: None,
            mask: None,
        }
    }

    /// Notes the decoder layer a weight belongs to.
    fn enter(&mut self, weight_scope: &str) {
        if let Some(rest) = weight_scope.strip_prefix("model.layers.") {
            let index = rest.split('.').next().unwrap_or(rest);
            self.layer = format!("model.layers.{index}");
        } else {
            self.layer = weight_scope.to_string();
        }
    }

    fn scope(&self, what: &str) -> String {
        format!("{}.{what}", self.layer)
    }

    /// `x` as rows `[batch, seq, width]`.
    fn rows(&mut self, x: &Value, scope: &str) -> String {
        match x.head_dim {
            None => x.name.clone(),
            Some(_) => {
                let shape = self.graph.i64s(&[0, 0, x.width as i64]);
                self.graph.op("Reshape", scope, &[&x.name, &shape], vec![])
            }
        }
    }

    /// `x` as heads `[batch, seq, width / head_dim, head_dim]`.
    fn heads(&mut self, x: &Value, head_dim: usize, scope: &str) -> Result<String, ExportError> {
        if x.head_dim == Some(head_dim) {
            return Ok(x.name.clone());
        }
        if head_dim == 0 || !x.width.is_multiple_of(head_dim) {
            return Err(bad(format!(
                "{} values per row do not split into heads of {head_dim}",
                x.width
            )));
        }
        let shape = self
            .graph
            .i64s(&[0, 0, (x.width / head_dim) as i64, head_dim as i64]);
        Ok(self.graph.op("Reshape", scope, &[&x.name, &shape], vec![]))
    }

    /// `cos` and signed `sin` at `position_ids`, built on first use.
    fn rope_tables(&mut self, head_dim: usize) -> Result<(String, String), ExportError> {
        if let Some((d, cos, sin)) = &self.rope {
            if *d != head_dim {
                return Err(bad(format!("RoPE over {head_dim} after {d}")));
            }
            return Ok((cos.clone(), sin.clone()));
        }
        if head_dim != self.config.head_dim {
            return Err(bad(format!(
                "RoPE over {head_dim} values, the config's head_dim is {}",
                self.config.head_dim
            )));
        }
        let positions = self.config.max_position_embeddings;
        let (cos, sin) = self.config.rope_tables(positions);
        let half = head_dim / 2;
        let mut cos_full = Vec::with_capacity(positions * head_dim);
        let mut sin_signed = Vec::with_capacity(positions * head_dim);
        for p in 0..positions {
            let (c, s) = (&cos[p * half..][..half], &sin[p * half..][..half]);
            cos_full.extend_from_slice(c);
            cos_full.extend_from_slice(c);
            sin_signed.extend(s.iter().map(|v| -v));
            sin_signed.extend_from_slice(s);
        }
        let mut gathered = Vec::with_capacity(2);
        for (label, table) in [("cos", cos_full), ("sin", sin_signed)] {
            let t = self.graph.external(
                format!("rotary.{label}_table"),
                &[positions, head_dim],
                Source::Values(table),
            );
            let scope = format!("rotary.{label}");
            let g = self.graph.op(
                "Gather",
                &scope,
                &[&t, "position_ids"],
                vec![int("axis", 0)],
            );
            let axes = self.graph.i64s(&[2]);
            gathered.push(self.graph.op("Unsqueeze", &scope, &[&g, &axes], vec![]));
        }
        let (cos, sin) = (gathered[0].clone(), gathered[1].clone());
        self.rope = Some((head_dim, cos.clone(), sin.clone()));
        Ok((cos, sin))
    }

    /// The boolean mask `[batch, 1, seq, past + seq]`, built on first use.
    fn mask(&mut self) -> String {
        if let Some(m) = &self.mask {
            return m.clone();
        }
        let g = &mut *self.graph;
        let s = "attention_mask";
        let (zero, one, axis1) = (g.i64_scalar(0), g.i64_scalar(1), g.i64_scalar(1));
        let ids_shape = g.op("Shape", s, &["input_ids"], vec![]);
        let seq = g.op("Gather", s, &[&ids_shape, &axis1], vec![int("axis", 0)]);
        let mask_shape = g.op("Shape", s, &["attention_mask"], vec![]);
        let total = g.op("Gather", s, &[&mask_shape, &axis1], vec![int("axis", 0)]);
        let past = g.op("Sub", s, &[&total, &seq], vec![]);
        let (row, col) = (g.i64s(&[0]), g.i64s(&[1]));
        let keys = g.op("Range", s, &[&zero, &total, &one], vec![]);
        let keys = g.op("Unsqueeze", s, &[&keys, &row], vec![]); // [1, total]
        let queries = g.op("Range", s, &[&past, &total, &one], vec![]);
        let queries = g.op("Unsqueeze", s, &[&queries, &col], vec![]); // [seq, 1]
        let causal = g.op("LessOrEqual", s, &[&keys, &queries], vec![]); // [seq, total]
        let pad = g.op(
            "Cast",
            s,
            &["attention_mask"],
            vec![int("to", ElemType::Bool as i64)],
        );
        let axes = g.i64s(&[1, 2]);
        let pad = g.op("Unsqueeze", s, &[&pad, &axes], vec![]); // [batch, 1, 1, total]
        let mask = g.op("And", s, &[&pad, &causal], vec![]);
        self.mask = Some(mask.clone());
        mask
    }

    /// `[batch, seq, heads, d]` → `[batch, heads, seq, d]`.
    fn transpose_heads(&mut self, x: &str, scope: &str) -> String {
        self.graph
            .op("Transpose", scope, &[x], vec![ints("perm", &[0, 2, 1, 3])])
    }
}

impl LlamaOps for Recorder<'_> {
    type Tensor = Value;
    type Linear = Linear;
    type Vector = Vector;
    type Embedding = Embedding;
    type Error = ExportError;
    type Logits = Value;

    fn embed(&mut self, table: &Embedding) -> Result<Value, ExportError> {
        let scope = "model.embed_tokens";
        let name = self.graph.op(
            "Gather",
            scope,
            &[&table.table, "input_ids"],
            vec![int("axis", 0)],
        );
        Ok(Value {
            name,
            width: table.hidden,
            head_dim: None,
        })
    }

    fn linear(&mut self, x: &Value, w: &Linear) -> Result<Value, ExportError> {
        if x.width != w.inp {
            return Err(bad(format!(
                "{}: {} inputs, {} values per row",
                w.scope, w.inp, x.width
            )));
        }
        self.enter(&w.scope);
        let scope = w.scope.as_str();
        let input = self.rows(x, scope);
        let g = &mut *self.graph;
        let mut y = if w.gemm {
            // [batch·seq, in] × [out, in]ᵀ, then back to [batch, seq, out].
            let flat_shape = g.i64s(&[-1, w.inp as i64]);
            let flat = g.op("Reshape", scope, &[&input, &flat_shape], vec![]);
            let mut inputs = vec![flat.as_str(), w.weight.as_str()];
            if let Some(b) = &w.bias {
                inputs.push(b);
            }
            let y = g.op("Gemm", scope, &inputs, vec![int("transB", 1)]);
            let ids_shape = g.op("Shape", scope, &["input_ids"], vec![]);
            let out = g.i64s(&[w.out as i64]);
            let shape = g.op("Concat", scope, &[&ids_shape, &out], vec![int("axis", 0)]);
            return Ok(Value {
                name: g.op("Reshape", scope, &[&y, &shape], vec![]),
                width: w.out,
                head_dim: None,
            });
        } else {
            g.op("MatMul", scope, &[&input, &w.weight], vec![])
        };
        if let Some(b) = &w.bias {
            y = g.op("Add", scope, &[&y, b], vec![]);
        }
        Ok(Value {
            name: y,
            width: w.out,
            head_dim: None,
        })
    }

    fn split(&mut self, x: &Value, widths: &[usize]) -> Result<Vec<Value>, ExportError> {
        if widths.iter().sum::<usize>() != x.width {
            return Err(bad(format!("split {widths:?} of {} values", x.width)));
        }
        if widths.len() == 1 {
            return Ok(vec![x.clone()]);
        }
        let scope = self.scope("split");
        let input = self.rows(x, &scope);
        let sizes: Vec<i64> = widths.iter().map(|&w| w as i64).collect();
        let sizes = self.graph.i64s(&sizes);
        let names = self.graph.op_n(
            "Split",
            &scope,
            &[&input, &sizes],
            widths.len(),
            vec![int("axis", -1)],
        );
        Ok(names
            .into_iter()
            .zip(widths)
            .map(|(name, &width)| Value {
                name,
                width,
                head_dim: None,
            })
            .collect())
    }

    fn rms_norm(
        &mut self,
        x: &Value,
        weight: &Vector,
        width: usize,
        eps: f64,
    ) -> Result<Value, ExportError> {
        self.enter(&weight.scope);
        let scope = weight.scope.as_str();
        let (input, head_dim) = if width == x.width {
            (self.rows(x, scope), None)
        } else {
            (self.heads(x, width, scope)?, Some(width))
        };
        let g = &mut *self.graph;
        let xf = g.cast_to_f32(&input, scope);
        let two = g.f32_scalar(2.0);
        let sq = g.op("Pow", scope, &[&xf, &two], vec![]);
        let mean = g.op(
            "ReduceMean",
            scope,
            &[&sq],
            vec![ints("axes", &[-1]), int("keepdims", 1)],
        );
        let eps = g.f32_scalar(eps as f32);
        let var = g.op("Add", scope, &[&mean, &eps], vec![]);
        let std = g.op("Sqrt", scope, &[&var], vec![]);
        let y = g.op("Div", scope, &[&xf, &std], vec![]);
        let y = g.cast_from_f32(&y, scope);
        Ok(Value {
            name: g.op("Mul", scope, &[&weight.name, &y], vec![]),
            width: x.width,
            head_dim,
        })
    }

    fn rope(&mut self, x: &Value, head_dim: usize) -> Result<Value, ExportError> {
        let (cos, sin) = self.rope_tables(head_dim)?;
        let scope = self.scope("rotary");
        let xh = self.heads(x, head_dim, &scope)?;
        let g = &mut *self.graph;
        let half = (head_dim / 2) as i64;
        let halves = g.i64s(&[half, half]);
        let parts = g.op_n("Split", &scope, &[&xh, &halves], 2, vec![int("axis", -1)]);
        let rotated = g.op(
            "Concat",
            &scope,
            &[&parts[1], &parts[0]],
            vec![int("axis", -1)],
        );
        let a = g.op("Mul", &scope, &[&xh, &cos], vec![]);
        let b = g.op("Mul", &scope, &[&rotated, &sin], vec![]);
        Ok(Value {
            name: g.op("Add", &scope, &[&a, &b], vec![]),
            width: x.width,
            head_dim: Some(head_dim),
        })
    }

    fn attention(
        &mut self,
        layer: usize,
        q: &Value,
        k: &Value,
        v: &Value,
        shape: AttentionShape,
    ) -> Result<Value, ExportError> {
        let (nh, nkv, hd) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
        if q.width != nh * hd || k.width != nkv * hd || v.width != nkv * hd {
            return Err(bad(format!(
                "attention of layer {layer}: q/k/v widths {}/{}/{} for {nh}/{nkv} heads of {hd}",
                q.width, k.width, v.width
            )));
        }
        let mask = self.mask();
        self.layer = format!("model.layers.{layer}");
        let scope = self.scope("self_attn");
        let s = scope.as_str();
        let qh = self.heads(q, hd, s)?;
        let q = self.transpose_heads(&qh, s);
        let kh = self.heads(k, hd, s)?;
        let k = self.transpose_heads(&kh, s);
        let vh = self.heads(v, hd, s)?;
        let v = self.transpose_heads(&vh, s);
        let g = &mut *self.graph;
        let axis2 = vec![int("axis", 2)];
        let past_k = format!("past_key_values.{layer}.key");
        let past_v = format!("past_key_values.{layer}.value");
        let k = g.op_to(
            "Concat",
            s,
            &[&past_k, &k],
            &format!("present.{layer}.key"),
            axis2.clone(),
        );
        let v = g.op_to(
            "Concat",
            s,
            &[&past_v, &v],
            &format!("present.{layer}.value"),
            axis2,
        );
        // Grouped-query attention without repeating K/V: the query heads sharing a KV head
        // (consecutive, as transformers' repeat_kv assumes) become extra query rows.
        let grouped = nh != nkv;
        let reshape = |g: &mut Graph, x: &str, dims: &[i64]| {
            let shape = g.i64s(dims);
            g.op("Reshape", s, &[x, &shape], vec![])
        };
        let mut q = q;
        if grouped {
            q = reshape(g, &q, &[0, nkv as i64, -1, hd as i64]);
        }
        let kt = g.op("Transpose", s, &[&k], vec![ints("perm", &[0, 1, 3, 2])]);
        let scores = g.op("MatMul", s, &[&q, &kt], vec![]);
        let scale = g.float_scalar(shape.scale() as f32);
        let mut scores = g.op("Mul", s, &[&scores, &scale], vec![]);
        if grouped {
            scores = reshape(g, &scores, &[0, nh as i64, -1, 0]);
        }
        let scores = g.cast_to_f32(&scores, s);
        let min = g.f32_scalar(f32::MIN);
        let scores = g.op("Where", s, &[&mask, &scores, &min], vec![]);
        let probs = g.op("Softmax", s, &[&scores], vec![int("axis", -1)]);
        let mut probs = g.cast_from_f32(&probs, s);
        if grouped {
            probs = reshape(g, &probs, &[0, nkv as i64, -1, 0]);
        }
        let mut ctx = g.op("MatMul", s, &[&probs, &v], vec![]);
        if grouped {
            ctx = reshape(g, &ctx, &[0, nh as i64, -1, hd as i64]);
        }
        let ctx = self.transpose_heads(&ctx, s);
        Ok(Value {
            name: ctx,
            width: nh * hd,
            head_dim: Some(hd),
        })
    }

    fn swiglu(&mut self, gate_up: &Value, inner: usize) -> Result<Value, ExportError> {
        if gate_up.width != 2 * inner {
            return Err(bad(format!(
                "swiglu of {} values with inner width {inner}",
                gate_up.width
            )));
        }
        let scope = self.scope("mlp.act");
        let input = self.rows(gate_up, &scope);
        let g = &mut *self.graph;
        let sizes = g.i64s(&[inner as i64, inner as i64]);
        let parts = g.op_n("Split", &scope, &[&input, &sizes], 2, vec![int("axis", -1)]);
        let sig = g.op("Sigmoid", &scope, &[&parts[0]], vec![]);
        let silu = g.op("Mul", &scope, &[&parts[0], &sig], vec![]);
        Ok(Value {
            name: g.op("Mul", &scope, &[&silu, &parts[1]], vec![]),
            width: inner,
            head_dim: None,
        })
    }

    fn add(&mut self, a: Value, b: &Value) -> Result<Value, ExportError> {
        if a.width != b.width {
            return Err(bad(format!("add of {} and {} values", a.width, b.width)));
        }
        let scope = self.scope("residual");
        let (left, right, head_dim) = match (a.head_dim, b.head_dim) {
            (x, y) if x == y => (a.name.clone(), b.name.clone(), x),
            _ => (self.rows(&a, &scope), self.rows(b, &scope), None),
        };
        Ok(Value {
            name: self.graph.op("Add", &scope, &[&left, &right], vec![]),
            width: a.width,
            head_dim,
        })
    }

    fn logits(&mut self, x: &Value, head: &Self::Linear) -> Result<Value, ExportError> {
        self.linear(x, head)
    }

    fn logit_rows(&mut self, x: Value) -> Result<Value, ExportError> {
        Ok(x)
    }
}
