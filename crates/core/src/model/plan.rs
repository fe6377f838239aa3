//! Which tensors a Llama-family checkpoint holds and how the model uses them: HF names, shapes,
//! fused groups (q/k/v, gate/up), optional biases and norms, and the tie rule for the head.

use crate::model::config::ModelConfig;

/// One tensor of the checkpoint, by its Hugging Face name, with the shape it must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Name in the safetensors files, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// Expected shape (`[out, in]` for projection weights, as HF stores them).
    pub shape: Vec<usize>,
}

impl TensorSpec {
    fn new(name: impl Into<String>, shape: &[usize]) -> Self {
        Self {
            name: name.into(),
            shape: shape.to_vec(),
        }
    }
}

/// A projection `y = x @ Wᵀ + b` whose weight is the row-wise concatenation of `parts`
/// (`[out_i, inp]` each; fused projections such as q/k/v have several) and whose bias, when
/// present, is the concatenation of `bias` (one `[out_i]` per part).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearSpec {
    /// The weights concatenated along the output dimension.
    pub parts: Vec<TensorSpec>,
    /// One bias per part, or none.
    pub bias: Option<Vec<TensorSpec>>,
    /// Total output width (sum of the parts' rows).
    pub out: usize,
    /// Input width.
    pub inp: usize,
}

impl LinearSpec {
    /// The weight parts, then the bias parts.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorSpec> {
        self.parts.iter().chain(self.bias.iter().flatten())
    }

    fn fused(names: &[(String, usize)], inp: usize, bias: bool) -> Self {
        let parts = names
            .iter()
            .map(|(n, out)| TensorSpec::new(format!("{n}.weight"), &[*out, inp]))
            .collect();
        let bias = bias.then(|| {
            names
                .iter()
                .map(|(n, out)| TensorSpec::new(format!("{n}.bias"), &[*out]))
                .collect()
        });
        Self {
            parts,
            bias,
            out: names.iter().map(|(_, o)| o).sum(),
            inp,
        }
    }
}

/// One decoder layer's tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerPlan {
    /// RMSNorm before attention.
    pub input_norm: TensorSpec,
    /// q, k and v fused: output `[q | k | v]`.
    pub qkv: LinearSpec,
    /// Per-head RMSNorm of q (Qwen3).
    pub q_norm: Option<TensorSpec>,
    /// Per-head RMSNorm of k (Qwen3).
    pub k_norm: Option<TensorSpec>,
    /// Attention output projection.
    pub o: LinearSpec,
    /// RMSNorm before the MLP.
    pub post_norm: TensorSpec,
    /// gate and up fused: output `[gate | up]`.
    pub gate_up: LinearSpec,
    /// MLP down projection.
    pub down: LinearSpec,
}

/// Every tensor a model needs, in the order the forward pass uses them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightPlan {
    /// Token embeddings `[vocab, hidden]`.
    pub embed: TensorSpec,
    /// Decoder layers.
    pub layers: Vec<LayerPlan>,
    /// Final RMSNorm.
    pub norm: TensorSpec,
    /// Output head; its single part is `embed` itself when `tied`.
    pub lm_head: LinearSpec,
    /// Whether the head reuses the embedding matrix (backends may store it once).
    pub tied: bool,
}

impl WeightPlan {
    /// The plan for `cfg`. `has_tensor` says whether the checkpoint holds a tensor: the head is
    /// tied when the config says so or when the checkpoint has no `lm_head.weight` (as
    /// transformers does for such checkpoints).
    pub fn new(cfg: &ModelConfig, has_tensor: impl Fn(&str) -> bool) -> Self {
        let (h, hd, inter) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
        let (q_out, kv_out) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                let attn = |m: &str| format!("{p}.self_attn.{m}");
                let mlp = |m: &str| format!("{p}.mlp.{m}");
                let norm = |m: &str| {
                    cfg.qk_norm
                        .then(|| TensorSpec::new(format!("{}.weight", attn(m)), &[hd]))
                };
                LayerPlan {
                    input_norm: TensorSpec::new(format!("{p}.input_layernorm.weight"), &[h]),
                    qkv: LinearSpec::fused(
                        &[
                            (attn("q_proj"), q_out),
                            (attn("k_proj"), kv_out),
                            (attn("v_proj"), kv_out),
                        ],
                        h,
                        cfg.attention_bias,
                    ),
                    q_norm: norm("q_norm"),
                    k_norm: norm("k_norm"),
                    o: LinearSpec::fused(&[(attn("o_proj"), h)], q_out, cfg.attention_out_bias),
                    post_norm: TensorSpec::new(
                        format!("{p}.post_attention_layernorm.weight"),
                        &[h],
                    ),
                    gate_up: LinearSpec::fused(
                        &[(mlp("gate_proj"), inter), (mlp("up_proj"), inter)],
                        h,
                        cfg.mlp_bias,
                    ),
                    down: LinearSpec::fused(&[(mlp("down_proj"), h)], inter, cfg.mlp_bias),
                }
            })
            .collect();
        let embed = TensorSpec::new("model.embed_tokens.weight", &[cfg.vocab_size, h]);
        let tied = cfg.tie_word_embeddings || !has_tensor("lm_head.weight");
        let head_name = if tied {
            "model.embed_tokens"
        } else {
            "lm_head"
        };
        Self {
            embed,
            layers,
            norm: TensorSpec::new("model.norm.weight", &[h]),
            lm_head: LinearSpec::fused(&[(head_name.to_string(), cfg.vocab_size)], h, false),
            tied,
        }
    }

    /// Every checkpoint tensor the plan reads, in load order (the embedding twice when tied).
    pub fn tensors(&self) -> impl Iterator<Item = &TensorSpec> {
        let linear = LinearSpec::tensors;
        let layers = self.layers.iter().flat_map(move |l| {
            std::iter::once(&l.input_norm)
                .chain(linear(&l.qkv))
                .chain(l.q_norm.iter())
                .chain(l.k_norm.iter())
                .chain(linear(&l.o))
                .chain(std::iter::once(&l.post_norm))
                .chain(linear(&l.gate_up))
                .chain(linear(&l.down))
        });
        std::iter::once(&self.embed)
            .chain(layers)
            .chain(std::iter::once(&self.norm))
            .chain(linear(&self.lm_head))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const QWEN2: &str = r#"{"architectures":["Qwen2ForCausalLM"],"hidden_size":32,"intermediate_size":48,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":97,
        "max_position_embeddings":64,"tie_word_embeddings":false}"#;

    #[test]
    fn qwen2_fuses_qkv_with_biases_and_keeps_an_untied_head() {
        let cfg = ModelConfig::from_json(Path::new("config.json"), QWEN2).unwrap();
        let plan = WeightPlan::new(&cfg, |_| true);
        let l = &plan.layers[1];
        assert_eq!(l.qkv.out, 32 + 16 + 16);
        assert_eq!(
            l.qkv.parts[1].name,
            "model.layers.1.self_attn.k_proj.weight"
        );
        assert_eq!(l.qkv.bias.as_ref().unwrap()[2].shape, vec![16]);
        assert!(l.q_norm.is_none());
        assert_eq!(l.gate_up.out, 96);
        assert_eq!(l.down.parts[0].shape, vec![32, 48]);
        assert!(!plan.tied);
        assert_eq!(plan.lm_head.parts[0].name, "lm_head.weight");
        // A checkpoint without a head is tied, whatever the config says.
        let plan = WeightPlan::new(&cfg, |n| n != "lm_head.weight");
        assert!(plan.tied);
        assert_eq!(plan.lm_head.parts[0], plan.embed);
    }

    #[test]
    fn qwen3_has_per_head_norms() {
        let json = QWEN2.replace("Qwen2", "Qwen3");
        let cfg = ModelConfig::from_json(Path::new("config.json"), &json).unwrap();
        let plan = WeightPlan::new(&cfg, |_| true);
        assert_eq!(plan.layers[0].q_norm.as_ref().unwrap().shape, vec![8]);
        assert!(plan.layers[0].qkv.bias.is_none());
    }
}
