//! [`LoadOps`] for the exporter: each tensor of the [`WeightPlan`](infermux_core::model::WeightPlan)
//! becomes an initializer of the graph, planned here (name, shape, place in the external data
//! file, where its values come from) and written later by [`super::write_data`].
//!
//! Projections are stored as MatMul's `[in, out]` (the checkpoint's `[out, in]` transposed), with
//! fused parts (q/k/v, gate/up) side by side along `out` as the plan says. A tied head keeps the
//! embedding's `[vocab, hidden]` layout and runs as `Gemm(transB = 1)`, so the matrix is stored
//! once and read by both the embedding `Gather` and the head.

use std::sync::Arc;

use infermux_core::model::{LinearSpec, LoadOps, LoraAdapter, TensorSpec, WeightPlan};

use super::ExportError;
use super::checkpoint::Checkpoint;
use super::graph::{Graph, Source};

/// A projection's initializers.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    /// The weight: `[in, out]` for MatMul, or `[out, in]` for Gemm with `transB` when `gemm`.
    pub weight: String,
    pub gemm: bool,
    /// `[out]`, when the projection has biases.
    pub bias: Option<String>,
    pub out: usize,
    pub inp: usize,
    /// Name prefix of the nodes that use it.
    pub scope: String,
}

/// A vector parameter (a norm weight).
#[derive(Debug, Clone)]
pub(crate) struct Vector {
    pub name: String,
    pub scope: String,
}

/// The embedding table `[vocab, hidden]`.
#[derive(Debug, Clone)]
pub(crate) struct Embedding {
    pub table: String,
    pub hidden: usize,
}

/// Plans initializers for the tensors of a checkpoint.
pub(crate) struct Loader<'a> {
    pub graph: &'a mut Graph,
    pub checkpoint: &'a Checkpoint,
    /// The plan's output head, and whether it is the embedding matrix.
    pub head: &'a LinearSpec,
    pub tied: bool,
    /// An adapter to merge into the projections it updates, with the plan it was read for.
    pub lora: Option<(&'a LoraAdapter, &'a WeightPlan)>,
}

/// A tensor's name without `.weight` / `.bias`: the scope of the nodes that use it.
pub(crate) fn scope_of(name: &str) -> String {
    name.strip_suffix(".weight")
        .or_else(|| name.strip_suffix(".bias"))
        .unwrap_or(name)
        .to_string()
}

/// The name of a fused tensor: `…self_attn.q_k_v_proj.weight` for `q_proj`, `k_proj`, `v_proj`;
/// a single part keeps its name.
fn fused_name(parts: &[TensorSpec]) -> String {
    if parts.len() == 1 {
        return parts[0].name.clone();
    }
    let split = |n: &str| {
        let (stem, suffix) = n.rsplit_once('.').unwrap_or((n, ""));
        let (parent, module) = stem.rsplit_once('.').unwrap_or(("", stem));
        (parent.to_string(), module.to_string(), suffix.to_string())
    };
    let (parent, _, suffix) = split(&parts[0].name);
    let modules: Vec<String> = parts.iter().map(|p| split(&p.name).1).collect();
    let joined = if modules.iter().all(|m| m.ends_with("_proj")) {
        let stems: Vec<&str> = modules
            .iter()
            .map(|m| m.trim_end_matches("_proj"))
            .collect();
        format!("{}_proj", stems.join("_"))
    } else {
        modules.join("_")
    };
    format!("{parent}.{joined}.{suffix}")
}

impl Loader<'_> {
    fn checked(&self, specs: &[TensorSpec]) -> Result<Vec<String>, ExportError> {
        specs
            .iter()
            .map(|s| {
                self.checkpoint.check(&s.name, &s.shape)?;
                Ok(s.name.clone())
            })
            .collect()
    }
}

impl LoadOps for Loader<'_> {
    type Linear = Linear;
    type Vector = Vector;
    type Embedding = Embedding;
    type Error = ExportError;

    fn linear(&mut self, spec: &LinearSpec) -> Result<Linear, ExportError> {
        let parts = self.checked(&spec.parts)?;
        let name = fused_name(&spec.parts);
        let scope = scope_of(&name);
        let gemm = self.tied && spec == self.head;
        let weight = if gemm {
            let source = Source::Checkpoint {
                parts,
                cols: spec.inp,
                transpose: false,
            };
            self.graph.external(name, &[spec.out, spec.inp], source)
        } else {
            let update = self
                .lora
                .and_then(|(adapter, plan)| adapter.update_of(plan, spec));
            let source = match update {
                Some(u) => Source::Merged {
                    parts,
                    update: Arc::new(u.clone()),
                },
                None => Source::Checkpoint {
                    parts,
                    cols: spec.inp,
                    transpose: true,
                },
            };
            self.graph
                .external(format!("{name}.T"), &[spec.inp, spec.out], source)
        };
        let bias = match &spec.bias {
            None => None,
            Some(specs) => {
                let parts = self.checked(specs)?;
                let source = Source::Checkpoint {
                    parts,
                    cols: 1,
                    transpose: false,
                };
                Some(self.graph.external(fused_name(specs), &[spec.out], source))
            }
        };
        Ok(Linear {
            weight,
            gemm,
            bias,
            out: spec.out,
            inp: spec.inp,
            scope,
        })
    }

    fn vector(&mut self, spec: &TensorSpec) -> Result<Vector, ExportError> {
        let parts = self.checked(std::slice::from_ref(spec))?;
        let source = Source::Checkpoint {
            parts,
            cols: 1,
            transpose: false,
        };
        let name = self.graph.external(spec.name.clone(), &spec.shape, source);
        Ok(Vector {
            scope: scope_of(&name),
            name,
        })
    }

    fn embedding(
        &mut self,
        spec: &TensorSpec,
        tied_head: Option<&Linear>,
    ) -> Result<Embedding, ExportError> {
        let hidden = spec.shape.get(1).copied().unwrap_or(0);
        if let Some(head) = tied_head.filter(|h| h.gemm) {
            return Ok(Embedding {
                table: head.weight.clone(),
                hidden,
            });
        }
        let parts = self.checked(std::slice::from_ref(spec))?;
        let source = Source::Checkpoint {
            parts,
            cols: hidden,
            transpose: false,
        };
        Ok(Embedding {
            table: self.graph.external(spec.name.clone(), &spec.shape, source),
            hidden,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            shape: vec![1],
        }
    }

    #[test]
    fn fused_tensors_are_named_after_their_parts() {
        let qkv = ["q_proj", "k_proj", "v_proj"]
            .map(|m| spec(&format!("model.layers.3.self_attn.{m}.weight")));
        assert_eq!(
            fused_name(&qkv),
            "model.layers.3.self_attn.q_k_v_proj.weight"
        );
        let bias = ["gate_proj", "up_proj"].map(|m| spec(&format!("model.layers.0.mlp.{m}.bias")));
        assert_eq!(fused_name(&bias), "model.layers.0.mlp.gate_up_proj.bias");
        assert_eq!(fused_name(&[spec("lm_head.weight")]), "lm_head.weight");
        assert_eq!(scope_of("model.norm.weight"), "model.norm");
    }
}
