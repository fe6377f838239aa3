//! A Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, SmolLM) in libtorch ops, run over a
//! flattened multi-sequence batch.
//!
//! Projections and the MLP run once over all tokens of the batch; attention runs per chunk
//! (libtorch's scaled-dot-product attention with native GQA) against that chunk's slot.

use infermux_core::{ForwardBatch, ModelConfig};
use tch::{Device, Kind, TchError, Tensor};

use crate::error::TorchBackendError;
use crate::kv_cache::KvCache;
use crate::weights::Weights;

/// One decoder layer, with q/k/v and gate/up fused into single projections.
struct Layer {
    input_norm: Tensor,
    qkv_w: Tensor,
    qkv_b: Option<Tensor>,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    o_w: Tensor,
    post_norm: Tensor,
    gate_up_w: Tensor,
    down_w: Tensor,
}

/// The whole model plus its RoPE tables (`[max_positions, head_dim]`, halves repeated).
pub(crate) struct Llama {
    cfg: ModelConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

fn load_err(e: TchError) -> TorchBackendError {
    TorchBackendError::Weights(e.to_string())
}

/// HF's RMSNorm: normalize in f32, scale by the weight in the model's kind.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor, TchError> {
    let kind = x.kind();
    let xf = x.f_to_kind(Kind::Float)?;
    let var = xf
        .f_pow_tensor_scalar(2)?
        .f_mean_dim(Some(&[-1i64][..]), true, Kind::Float)?;
    let normed = xf
        .f_mul(&var.f_add_scalar(eps)?.f_rsqrt()?)?
        .f_to_kind(kind)?;
    w.f_mul(&normed)
}

/// `x * cos + rotate_half(x) * sin` on the last dimension.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor, TchError> {
    let half = x.size().last().copied().unwrap_or(0) / 2;
    let x1 = x.f_narrow(-1, 0, half)?;
    let x2 = x.f_narrow(-1, half, half)?;
    let rotated = Tensor::f_cat(&[x2.f_neg()?, x1], -1)?;
    x.f_mul(cos)?.f_add(&rotated.f_mul(sin)?)
}

impl Llama {
    /// Loads the weights named as Hugging Face names them.
    pub fn load(
        cfg: &ModelConfig,
        w: &Weights,
        device: Device,
        kind: Kind,
    ) -> Result<Self, TorchBackendError> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (q_out, kv_out, inter) = (
            cfg.num_heads * hd,
            cfg.num_kv_heads * hd,
            cfg.intermediate_size,
        );
        let embed = w.get("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let get = |n: &str, s: &[usize]| w.get(&format!("{p}.{n}"), s);
            let cat = |parts: &[Tensor]| Tensor::f_cat(parts, 0).map_err(load_err);
            let qkv_w = cat(&[
                get("self_attn.q_proj.weight", &[q_out, h])?,
                get("self_attn.k_proj.weight", &[kv_out, h])?,
                get("self_attn.v_proj.weight", &[kv_out, h])?,
            ])?;
            let qkv_b = if cfg.attention_bias {
                Some(cat(&[
                    get("self_attn.q_proj.bias", &[q_out])?,
                    get("self_attn.k_proj.bias", &[kv_out])?,
                    get("self_attn.v_proj.bias", &[kv_out])?,
                ])?)
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
            layers.push(Layer {
                input_norm: get("input_layernorm.weight", &[h])?,
                qkv_w,
                qkv_b,
                q_norm: norm("self_attn.q_norm.weight")?,
                k_norm: norm("self_attn.k_norm.weight")?,
                o_w: get("self_attn.o_proj.weight", &[h, q_out])?,
                post_norm: get("post_attention_layernorm.weight", &[h])?,
                gate_up_w: cat(&[
                    get("mlp.gate_proj.weight", &[inter, h])?,
                    get("mlp.up_proj.weight", &[inter, h])?,
                ])?,
                down_w: get("mlp.down_proj.weight", &[h, inter])?,
            });
        }
        let norm = w.get("model.norm.weight", &[h])?;
        let lm_head = match w.get_opt("lm_head.weight", &[cfg.vocab_size, h])? {
            Some(t) if !cfg.tie_word_embeddings => t,
            _ => embed.shallow_clone(),
        };
        let (cos, sin) = cfg.rope_tables(cfg.max_position_embeddings);
        let table = |v: Vec<f32>| -> Result<Tensor, TchError> {
            let half = Tensor::f_from_slice(&v)?
                .f_view([cfg.max_position_embeddings as i64, (hd / 2) as i64])?;
            Tensor::f_cat(&[&half, &half], -1)?
                .f_to_device(device)?
                .f_to_kind(kind)
        };
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            layers,
            norm,
            lm_head,
            cos: table(cos).map_err(load_err)?,
            sin: table(sin).map_err(load_err)?,
            device,
        })
    }

    /// Runs `batch`, updating `kv`, and returns the requested logits rows as `[rows, vocab]` f32
    /// on the CPU.
    pub fn forward(&self, batch: &ForwardBatch, kv: &mut KvCache) -> Result<Tensor, TchError> {
        let cfg = &self.cfg;
        let eps = cfg.rms_norm_eps;
        let tokens: Vec<i64> = batch
            .chunks
            .iter()
            .flat_map(|c| c.tokens.iter().map(|&t| t as i64))
            .collect();
        let positions: Vec<i64> = batch
            .chunks
            .iter()
            .flat_map(|c| (c.start_pos..c.start_pos + c.tokens.len()).map(|p| p as i64))
            .collect();
        let positions = Tensor::f_from_slice(&positions)?.f_to_device(self.device)?;
        // [n, 1, hd]: broadcast over heads.
        let cos = self.cos.f_index_select(0, &positions)?.f_unsqueeze(1)?;
        let sin = self.sin.f_index_select(0, &positions)?.f_unsqueeze(1)?;
        for c in &batch.chunks {
            kv.reserve(c.slot, c.tokens.len())?;
        }
        let ids = Tensor::f_from_slice(&tokens)?.f_to_device(self.device)?;
        let mut x = self.embed.f_index_select(0, &ids)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.input_norm, eps)?;
            let attn = self.attention(li, layer, &h, (&cos, &sin), batch, kv)?;
            x = x.f_add(&attn.f_linear(&layer.o_w, None::<Tensor>)?)?;
            let h = rms_norm(&x, &layer.post_norm, eps)?;
            let gu = h.f_linear(&layer.gate_up_w, None::<Tensor>)?;
            let inter = cfg.intermediate_size as i64;
            let act = gu
                .f_narrow(1, 0, inter)?
                .f_silu()?
                .f_mul(&gu.f_narrow(1, inter, inter)?)?;
            x = x.f_add(&act.f_linear(&layer.down_w, None::<Tensor>)?)?;
        }
        for c in &batch.chunks {
            kv.advance(c.slot, c.tokens.len());
        }
        let rows: Vec<i64> = batch
            .logit_row_indices()
            .into_iter()
            .map(|r| r as i64)
            .collect();
        let rows = Tensor::f_from_slice(&rows)?.f_to_device(self.device)?;
        let x = rms_norm(&x.f_index_select(0, &rows)?, &self.norm, eps)?;
        x.f_linear(&self.lm_head, None::<Tensor>)?
            .f_to_kind(Kind::Float)?
            .f_to_device(Device::Cpu)
    }

    /// Self-attention of every chunk against its own slot; returns `[tokens, heads * head_dim]`.
    fn attention(
        &self,
        li: usize,
        layer: &Layer,
        h: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        batch: &ForwardBatch,
        kv: &mut KvCache,
    ) -> Result<Tensor, TchError> {
        let cfg = &self.cfg;
        let (nh, nkv, hd) = (
            cfg.num_heads as i64,
            cfg.num_kv_heads as i64,
            cfg.head_dim as i64,
        );
        let n = h.size()[0];
        let qkv = h.f_linear(&layer.qkv_w, layer.qkv_b.as_ref())?;
        let split = |start: i64, heads: i64, norm: &Option<Tensor>| -> Result<Tensor, TchError> {
            let t = qkv
                .f_narrow(1, start * hd, heads * hd)?
                .f_view([n, heads, hd])?;
            match norm {
                Some(w) => rms_norm(&t, w, cfg.rms_norm_eps),
                None => Ok(t),
            }
        };
        let q = rope(&split(0, nh, &layer.q_norm)?, cos, sin)?;
        let k = rope(&split(nh, nkv, &layer.k_norm)?, cos, sin)?;
        let v = split(nh + nkv, nkv, &None)?;
        let mut outs = Vec::with_capacity(batch.chunks.len());
        let mut offset = 0i64;
        for c in &batch.chunks {
            let t = c.tokens.len() as i64;
            // [t, heads, hd] → [1, heads, t, hd]
            let as_bhtd = |x: &Tensor| x.f_narrow(0, offset, t)?.f_transpose(0, 1)?.f_unsqueeze(0);
            let (k_all, v_all) =
                kv.append(c.slot, li, c.start_pos, &as_bhtd(&k)?, &as_bhtd(&v)?)?;
            let qc = as_bhtd(&q)?;
            let (mask, is_causal) = match (t, c.start_pos) {
                (1, _) => (None, false),
                (_, 0) => (None, true),
                _ => (
                    Some(causal_mask(t, c.start_pos as i64, self.device)?),
                    false,
                ),
            };
            let o = Tensor::f_scaled_dot_product_attention(
                &qc, &k_all, &v_all, mask, 0.0, is_causal, None, true,
            )?;
            outs.push(
                o.f_squeeze_dim(0)?
                    .f_transpose(0, 1)?
                    .f_reshape([t, nh * hd])?,
            );
            offset += t;
        }
        Tensor::f_cat(&outs, 0)
    }
}

/// `[t, start + t]` boolean mask: query i (at position start + i) sees keys 0..=start + i.
fn causal_mask(t: i64, start: i64, device: Device) -> Result<Tensor, TchError> {
    let rows = Tensor::f_arange(t, (Kind::Int64, device))?
        .f_add_scalar(start)?
        .f_unsqueeze(1)?;
    let cols = Tensor::f_arange(start + t, (Kind::Int64, device))?.f_unsqueeze(0)?;
    cols.f_le_tensor(&rows)
}
