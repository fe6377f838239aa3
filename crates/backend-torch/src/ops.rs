//! The core's Llama op set in libtorch ops: [`TorchLoader`] turns the weight plan into tensors,
//! [`TorchForward`] runs one forward pass over a flattened batch.
//!
//! Activations are `[tokens, width]` tensors in the model's kind. Projections, norms and the MLP
//! run once over all tokens of the batch; attention runs per chunk (libtorch's SDPA with native
//! GQA) against that chunk's KV slot. Nothing here knows an architecture: biases and q/k norms
//! are whatever the plan holds.

use infermux_core::model::{
    AttentionShape, LinearSpec, LlamaOps, LlamaWeights, LoadOps, LoraSite, TensorSpec,
};
use infermux_core::{BackendError, ForwardBatch, KvTable, ModelConfig};
use tch::{Device, Kind, TchError, Tensor};

use crate::device::runtime_error;
use crate::error::TorchBackendError;
use crate::kv::SlotKv;
use crate::lora::AdapterRows;
use crate::weights::Weights;

/// A projection `y = x @ weightᵀ + bias`, its parts already concatenated.
pub(crate) struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

/// A whole model's weights as libtorch tensors.
pub(crate) type TorchWeights = LlamaWeights<Linear, Tensor, Tensor>;

/// Loads plan entries from a checkpoint, fusing parts with `cat`.
pub(crate) struct TorchLoader<'a> {
    weights: &'a Weights,
}

impl<'a> TorchLoader<'a> {
    /// A loader reading from `weights`.
    pub fn new(weights: &'a Weights) -> Self {
        Self { weights }
    }

    /// The parts concatenated along dim 0 (a single part is returned as loaded, without a copy).
    fn fused(&self, parts: &[TensorSpec]) -> Result<Tensor, TorchBackendError> {
        let mut loaded = parts
            .iter()
            .map(|p| self.weights.load(p))
            .collect::<Result<Vec<_>, _>>()?;
        if loaded.len() == 1
            && let Some(t) = loaded.pop()
        {
            return Ok(t);
        }
        Tensor::f_cat(&loaded, 0).map_err(|e| TorchBackendError::Tensor {
            name: parts.first().map_or_else(String::new, |p| p.name.clone()),
            message: e.to_string(),
        })
    }
}

impl LoadOps for TorchLoader<'_> {
    type Linear = Linear;
    type Vector = Tensor;
    type Embedding = Tensor;
    type Error = TorchBackendError;

    fn linear(&mut self, spec: &LinearSpec) -> Result<Linear, TorchBackendError> {
        Ok(Linear {
            weight: self.fused(&spec.parts)?,
            bias: spec.bias.as_deref().map(|b| self.fused(b)).transpose()?,
        })
    }

    fn vector(&mut self, spec: &TensorSpec) -> Result<Tensor, TorchBackendError> {
        self.weights.load(spec)
    }

    /// A tied head's weight *is* the embedding table: the two share one tensor.
    fn embedding(
        &mut self,
        spec: &TensorSpec,
        tied_head: Option<&Linear>,
    ) -> Result<Tensor, TorchBackendError> {
        match tied_head {
            Some(head) => Ok(head.weight.shallow_clone()),
            None => self.weights.load(spec),
        }
    }
}

/// RoPE `cos` and `sin` for every position, `[max_positions, head_dim]` in the model's kind
/// (each half-width table repeated, the `rotate_half` layout), computed once per model.
pub(crate) struct RopeTables {
    cos: Tensor,
    sin: Tensor,
}

impl RopeTables {
    /// The tables of `cfg` (the core computes them, scaling included) on `device` in `kind`.
    pub fn new(cfg: &ModelConfig, device: Device, kind: Kind) -> Result<Self, TchError> {
        let positions = cfg.max_position_embeddings;
        let (cos, sin) = cfg.rope_tables(positions);
        let table = |v: Vec<f32>| -> Result<Tensor, TchError> {
            let half = Tensor::f_from_slice(&v)?.f_view([positions as i64, -1])?;
            Tensor::f_cat(&[&half, &half], -1)?
                .f_to_device(device)?
                .f_to_kind(kind)
        };
        Ok(Self {
            cos: table(cos)?,
            sin: table(sin)?,
        })
    }
}

/// One forward pass: the batch, its tokens and positions on the device, the RoPE rows of those
/// positions, and the KV table whose (already reserved) slots attention writes and reads.
pub(crate) struct TorchForward<'a> {
    batch: &'a ForwardBatch,
    adapter_rows: AdapterRows<'a>,
    kv: &'a KvTable<SlotKv>,
    device: Device,
    /// Token ids, `[tokens]`.
    ids: Tensor,
    /// `[tokens, 1, head_dim]`: each token's row, broadcast over heads.
    cos: Tensor,
    sin: Tensor,
}

impl<'a> TorchForward<'a> {
    /// Prepares `batch`; every chunk's slot must already have room for its tokens in `kv`.
    pub fn new(
        batch: &'a ForwardBatch,
        rope: &RopeTables,
        kv: &'a KvTable<SlotKv>,
        adapter_rows: AdapterRows<'a>,
        device: Device,
    ) -> Result<Self, TchError> {
        let (mut ids, mut positions) = (Vec::new(), Vec::new());
        for c in &batch.chunks {
            ids.extend(c.tokens.iter().map(|&t| i64::from(t)));
            positions.extend((c.start_pos..c.start_pos + c.tokens.len()).map(|p| p as i64));
        }
        let positions = Tensor::f_from_slice(&positions)?.f_to_device(device)?;
        Ok(Self {
            batch,
            adapter_rows,
            kv,
            device,
            ids: Tensor::f_from_slice(&ids)?.f_to_device(device)?,
            cos: rope.cos.f_index_select(0, &positions)?.f_unsqueeze(1)?,
            sin: rope.sin.f_index_select(0, &positions)?.f_unsqueeze(1)?,
        })
    }

    /// Attention of every chunk against its own slot (see [`LlamaOps::attention`]).
    fn attend(
        &self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        shape: AttentionShape,
    ) -> Result<Tensor, BackendError> {
        let (nh, nkv, hd) = (
            shape.num_heads as i64,
            shape.num_kv_heads as i64,
            shape.head_dim as i64,
        );
        let heads = |x: &Tensor, n: i64| x.f_reshape([-1, n, hd]).map_err(runtime_error);
        let (q, k, v) = (heads(q, nh)?, heads(k, nkv)?, heads(v, nkv)?);
        let mut outs = Vec::with_capacity(self.batch.chunks.len());
        let mut offset = 0i64;
        for c in &self.batch.chunks {
            let t = c.tokens.len() as i64;
            if t == 0 {
                continue;
            }
            let slot = self
                .kv
                .get(c.slot)
                .ok_or(BackendError::UnknownSlot(c.slot))?;
            let cache = &slot.storage.layers[layer];
            let chunk = || -> Result<Tensor, TchError> {
                // [t, heads, hd] → [1, heads, t, hd]
                let bhtd = |x: &Tensor| x.f_narrow(0, offset, t)?.f_transpose(0, 1)?.f_unsqueeze(0);
                let (k_all, v_all) = cache.append(c.start_pos, &bhtd(&k)?, &bhtd(&v)?)?;
                // One query sees everything cached; a first chunk is plainly causal; a later
                // multi-token chunk needs the mask offset by what is cached.
                let (mask, is_causal) = match (t, c.start_pos) {
                    (1, _) => (None, false),
                    (_, 0) => (None, true),
                    (_, start) => (Some(causal_mask(t, start as i64, self.device)?), false),
                };
                let o = Tensor::f_scaled_dot_product_attention(
                    &bhtd(&q)?,
                    &k_all,
                    &v_all,
                    mask,
                    0.0,
                    is_causal,
                    Some(shape.scale()),
                    true,
                )?;
                o.f_squeeze_dim(0)?
                    .f_transpose(0, 1)?
                    .f_reshape([t, nh * hd])
            };
            outs.push(chunk().map_err(runtime_error)?);
            offset += t;
        }
        Tensor::f_cat(&outs, 0).map_err(runtime_error)
    }
}

/// `[t, start + t]` boolean mask: query `i` (at position `start + i`) sees keys `0..=start + i`.
fn causal_mask(t: i64, start: i64, device: Device) -> Result<Tensor, TchError> {
    let rows = Tensor::f_arange(t, (Kind::Int64, device))?
        .f_add_scalar(start)?
        .f_unsqueeze(1)?;
    let cols = Tensor::f_arange(start + t, (Kind::Int64, device))?.f_unsqueeze(0)?;
    cols.f_le_tensor(&rows)
}

/// Hugging Face's RMSNorm over the last dimension: normalize in f32, cast back to the input's
/// kind, then multiply by the weight.
fn rms_norm_last(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor, TchError> {
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
fn rotate_half_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor, TchError> {
    let half = x.size().last().copied().unwrap_or(0) / 2;
    let x1 = x.f_narrow(-1, 0, half)?;
    let x2 = x.f_narrow(-1, half, half)?;
    let rotated = Tensor::f_cat(&[x2.f_neg()?, x1], -1)?;
    x.f_mul(cos)?.f_add(&rotated.f_mul(sin)?)
}

/// `[tokens, groups × width]` viewed as `[tokens, groups, width]`, `f` applied, viewed back.
fn per_group(
    x: &Tensor,
    width: usize,
    f: impl FnOnce(&Tensor) -> Result<Tensor, TchError>,
) -> Result<Tensor, TchError> {
    let cols = x.size().get(1).copied().unwrap_or(0);
    if cols == width as i64 {
        return f(x);
    }
    f(&x.f_reshape([-1, cols / width as i64, width as i64])?)?.f_reshape([-1, cols])
}

impl LlamaOps for TorchForward<'_> {
    type Tensor = Tensor;
    type Linear = Linear;
    type Vector = Tensor;
    type Embedding = Tensor;
    type Error = BackendError;
    type Logits = Tensor;

    fn embed(&mut self, table: &Tensor) -> Result<Tensor, BackendError> {
        table.f_index_select(0, &self.ids).map_err(runtime_error)
    }

    fn linear(&mut self, x: &Tensor, w: &Linear) -> Result<Tensor, BackendError> {
        x.f_linear(&w.weight, w.bias.as_ref())
            .map_err(runtime_error)
    }

    fn lora(
        &mut self,
        x: &Tensor,
        y: Tensor,
        layer: usize,
        site: LoraSite,
    ) -> Result<Tensor, BackendError> {
        self.adapter_rows
            .apply(x, y, layer, site)
            .map_err(runtime_error)
    }

    fn split(&mut self, x: &Tensor, widths: &[usize]) -> Result<Vec<Tensor>, BackendError> {
        let mut start = 0i64;
        widths
            .iter()
            .map(|&w| {
                let piece = x.f_narrow(1, start, w as i64);
                start += w as i64;
                piece.map_err(runtime_error)
            })
            .collect()
    }

    fn rms_norm(
        &mut self,
        x: &Tensor,
        weight: &Tensor,
        width: usize,
        eps: f64,
    ) -> Result<Tensor, BackendError> {
        per_group(x, width, |g| rms_norm_last(g, weight, eps)).map_err(runtime_error)
    }

    fn rope(&mut self, x: &Tensor, head_dim: usize) -> Result<Tensor, BackendError> {
        let (cos, sin) = (&self.cos, &self.sin);
        // Even one head goes through the `[tokens, heads, head_dim]` view: cos/sin broadcast
        // over its heads dimension.
        x.f_reshape([x.size()[0], -1, head_dim as i64])
            .and_then(|h| rotate_half_rope(&h, cos, sin))
            .and_then(|h| h.f_reshape([x.size()[0], -1]))
            .map_err(runtime_error)
    }

    fn attention(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        shape: AttentionShape,
    ) -> Result<Tensor, BackendError> {
        self.attend(layer, q, k, v, shape)
    }

    fn swiglu(&mut self, gate_up: &Tensor, inner: usize) -> Result<Tensor, BackendError> {
        let inner = inner as i64;
        gate_up
            .f_narrow(1, 0, inner)
            .and_then(|g| g.f_silu())
            .and_then(|g| g.f_mul(&gate_up.f_narrow(1, inner, inner)?))
            .map_err(runtime_error)
    }

    /// In place: the residual stream is owned and nothing else views it.
    fn add(&mut self, mut a: Tensor, b: &Tensor) -> Result<Tensor, BackendError> {
        a.f_add_(b).map_err(runtime_error)
    }

    fn logits(&mut self, x: &Tensor, head: &Self::Linear) -> Result<Tensor, BackendError> {
        self.linear(x, head)
    }

    fn logit_rows(&mut self, x: Tensor) -> Result<Tensor, BackendError> {
        let rows: Vec<i64> = self
            .batch
            .logit_row_indices()
            .into_iter()
            .map(|r| r as i64)
            .collect();
        Tensor::f_from_slice(&rows)
            .and_then(|r| r.f_to_device(self.device))
            .and_then(|r| x.f_index_select(0, &r))
            .map_err(runtime_error)
    }
}
