//! A Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, SmolLM) in candle ops, run over a
//! flattened multi-sequence batch.
//!
//! Projections and the MLP run once over all tokens of the batch; attention runs per chunk
//! against that chunk's slot in the [`KvCache`].

use candle_core::{DType, Device, Tensor};
use infermux_core::{ForwardBatch, ModelConfig};

use crate::error::CandleBackendError;
use crate::kv_cache::KvCache;
use crate::weights::Weights;

/// `x @ wᵀ + b` with `w` stored as `[out, in]`, as in Hugging Face checkpoints.
struct Linear {
    w: Tensor,
    b: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = x.matmul(&self.w.t()?)?;
        match &self.b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// One decoder layer, with q/k/v and gate/up fused into single projections.
struct Layer {
    input_norm: Tensor,
    qkv: Linear,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    o: Linear,
    post_norm: Tensor,
    gate_up: Linear,
    down: Linear,
}

/// The whole model plus its RoPE tables.
pub(crate) struct Llama {
    cfg: ModelConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    cos: Tensor,
    sin: Tensor,
    dtype: DType,
}

fn load_err(e: candle_core::Error) -> CandleBackendError {
    CandleBackendError::Weights(e.to_string())
}

impl Llama {
    /// Loads the weights named as Hugging Face names them.
    pub fn load(
        cfg: &ModelConfig,
        w: &Weights,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, CandleBackendError> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (q_out, kv_out) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        let embed = w.get("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let get = |n: &str, s: &[usize]| w.get(&format!("{p}.{n}"), s);
            let qkv_w = Tensor::cat(
                &[
                    get("self_attn.q_proj.weight", &[q_out, h])?,
                    get("self_attn.k_proj.weight", &[kv_out, h])?,
                    get("self_attn.v_proj.weight", &[kv_out, h])?,
                ],
                0,
            )
            .map_err(load_err)?;
            let qkv_b = if cfg.attention_bias {
                let b = Tensor::cat(
                    &[
                        get("self_attn.q_proj.bias", &[q_out])?,
                        get("self_attn.k_proj.bias", &[kv_out])?,
                        get("self_attn.v_proj.bias", &[kv_out])?,
                    ],
                    0,
                )
                .map_err(load_err)?;
                Some(b)
            } else {
                None
            };
            let norm = |n: &str| {
                if cfg.qk_norm {
                    get(n, &[hd]).map(Some)
                } else {
                    Ok(None)
                }
            };
            let gate_up = Tensor::cat(
                &[
                    get("mlp.gate_proj.weight", &[cfg.intermediate_size, h])?,
                    get("mlp.up_proj.weight", &[cfg.intermediate_size, h])?,
                ],
                0,
            )
            .map_err(load_err)?;
            layers.push(Layer {
                input_norm: get("input_layernorm.weight", &[h])?,
                qkv: Linear { w: qkv_w, b: qkv_b },
                q_norm: norm("self_attn.q_norm.weight")?,
                k_norm: norm("self_attn.k_norm.weight")?,
                o: Linear {
                    w: get("self_attn.o_proj.weight", &[h, q_out])?,
                    b: None,
                },
                post_norm: get("post_attention_layernorm.weight", &[h])?,
                gate_up: Linear {
                    w: gate_up,
                    b: None,
                },
                down: Linear {
                    w: get("mlp.down_proj.weight", &[h, cfg.intermediate_size])?,
                    b: None,
                },
            });
        }
        let norm = w.get("model.norm.weight", &[h])?;
        let lm_head = match w.get_opt("lm_head.weight", &[cfg.vocab_size, h])? {
            Some(t) if !cfg.tie_word_embeddings => t,
            _ => embed.clone(),
        };
        let (cos, sin) = cfg.rope_tables(cfg.max_position_embeddings);
        let half = hd / 2;
        let table = |v: Vec<f32>| {
            Tensor::from_vec(v, (cfg.max_position_embeddings, half), device)?.to_dtype(dtype)
        };
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            layers,
            norm,
            lm_head,
            cos: table(cos).map_err(load_err)?,
            sin: table(sin).map_err(load_err)?,
            dtype,
        })
    }

    /// Runs `batch`, updating `kv`, and returns the requested logits rows as `[rows, vocab]` f32.
    pub fn forward(
        &self,
        batch: &ForwardBatch,
        kv: &mut KvCache,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let cfg = &self.cfg;
        let tokens: Vec<u32> = batch
            .chunks
            .iter()
            .flat_map(|c| c.tokens.iter().copied())
            .collect();
        let positions: Vec<u32> = batch
            .chunks
            .iter()
            .flat_map(|c| (c.start_pos..c.start_pos + c.tokens.len()).map(|p| p as u32))
            .collect();
        let n = tokens.len();
        let positions = Tensor::from_vec(positions, n, device)?;
        let cos = self.cos.index_select(&positions, 0)?;
        let sin = self.sin.index_select(&positions, 0)?;
        for c in &batch.chunks {
            kv.reserve(c.slot, c.tokens.len())?;
        }
        let mut x = self
            .embed
            .index_select(&Tensor::from_vec(tokens, n, device)?, 0)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.input_norm, cfg.rms_norm_eps as f32)?;
            let attn = self.attention(li, layer, &h, &cos, &sin, batch, kv)?;
            x = (x + layer.o.forward(&attn)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.post_norm, cfg.rms_norm_eps as f32)?;
            let gu = layer.gate_up.forward(&h)?;
            let gate = gu.narrow(1, 0, cfg.intermediate_size)?;
            let up = gu.narrow(1, cfg.intermediate_size, cfg.intermediate_size)?;
            x = (x + layer.down.forward(&(candle_nn::ops::silu(&gate)? * up)?)?)?;
        }
        for c in &batch.chunks {
            kv.advance(c.slot, c.tokens.len());
        }
        let rows = batch.logit_row_indices();
        if rows.is_empty() {
            return Tensor::zeros((0, cfg.vocab_size), DType::F32, device);
        }
        let rows = Tensor::from_vec(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            rows.len(),
            device,
        )?;
        let x = x.index_select(&rows, 0)?;
        let x = candle_nn::ops::rms_norm(&x, &self.norm, cfg.rms_norm_eps as f32)?;
        x.matmul(&self.lm_head.t()?)?.to_dtype(DType::F32)
    }

    /// Self-attention of every chunk against its own slot; returns `[tokens, heads * head_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        li: usize,
        layer: &Layer,
        h: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        batch: &ForwardBatch,
        kv: &mut KvCache,
    ) -> candle_core::Result<Tensor> {
        let cfg = &self.cfg;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let n = h.dim(0)?;
        let qkv = layer.qkv.forward(h)?;
        // [n, heads, hd] → [1, heads, n, hd] for RoPE over all tokens at once.
        let split = |start: usize,
                     heads: usize,
                     norm: &Option<Tensor>|
         -> candle_core::Result<Tensor> {
            let t = qkv
                .narrow(1, start * hd, heads * hd)?
                .reshape((n, heads, hd))?;
            let t = match norm {
                Some(w) => candle_nn::ops::rms_norm(&t.contiguous()?, w, cfg.rms_norm_eps as f32)?,
                None => t,
            };
            t.transpose(0, 1)?.contiguous()?.unsqueeze(0)
        };
        let q = candle_nn::rotary_emb::rope(&split(0, nh, &layer.q_norm)?, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&split(nh, nkv, &layer.k_norm)?, cos, sin)?;
        let v = split(nh + nkv, nkv, &None)?;
        let q = (q.squeeze(0)? * (1.0 / (hd as f64).sqrt()))?;
        let (k, v) = (k.squeeze(0)?, v.squeeze(0)?);
        let groups = nh / nkv;
        let mut outs = Vec::with_capacity(batch.chunks.len());
        let mut offset = 0;
        for c in &batch.chunks {
            let t = c.tokens.len();
            let (k_all, v_all) = kv.append(
                c.slot,
                li,
                c.start_pos,
                &k.narrow(1, offset, t)?,
                &v.narrow(1, offset, t)?,
            )?;
            let total = c.start_pos + t;
            // Grouped-query attention without repeating KV: [nkv, groups * t, hd].
            let qc = q.narrow(1, offset, t)?.reshape((nkv, groups * t, hd))?;
            let scores = qc.matmul(&k_all.t()?)?;
            let scores = if t > 1 {
                let mask = causal_mask(t, c.start_pos, h.device())?.to_dtype(scores.dtype())?;
                scores
                    .reshape((nkv, groups, t, total))?
                    .broadcast_add(&mask)?
                    .reshape((nkv, groups * t, total))?
            } else {
                scores
            };
            let probs = if self.dtype == DType::F32 {
                candle_nn::ops::softmax_last_dim(&scores)?
            } else {
                candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?
                    .to_dtype(self.dtype)?
            };
            let o = probs.matmul(&v_all)?; // [nkv, groups * t, hd]; v_all is a strided view
            outs.push(
                o.reshape((nh, t, hd))?
                    .transpose(0, 1)?
                    .reshape((t, nh * hd))?,
            );
            offset += t;
        }
        Tensor::cat(&outs, 0)
    }
}

/// `[t, start + t]` additive mask: query i (at position start + i) sees keys 0..=start + i.
fn causal_mask(t: usize, start: usize, device: &Device) -> candle_core::Result<Tensor> {
    let total = start + t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j <= start + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (t, total), device)
}
