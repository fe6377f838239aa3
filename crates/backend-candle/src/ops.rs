//! The one model definition's ops ([`LoadOps`], [`LlamaOps`]) on candle tensors.
//!
//! On the CPU in f32 with [`crate::CpuKernels::Custom`] the ops run our kernels as candle
//! custom ops ([`crate::cpu`]); everywhere else they are candle's built-in tensor ops.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use infermux_core::SeqChunk;
use infermux_core::kv::KvSlot;
use infermux_core::model::{AttentionShape, LinearSpec, LlamaOps, LoadOps, LoraSite, TensorSpec};

use candle_core::quantized::QMatMul;

use crate::cpu::{self, ElemKind, Isa, Matrix, PackedMatrix, QuantKind, QuantMatrix};
use crate::error::CandleBackendError;
use crate::kv::SlotKv;
use crate::lora::AdapterRows;
use crate::weights::{HalfValues, Weights};

/// Where and how the ops run, fixed at load.
#[derive(Clone)]
pub(crate) struct Runtime {
    pub device: Device,
    pub dtype: DType,
    /// `Some`: CPU f32 with our kernels in this ISA.
    pub cpu: Option<Isa>,
    /// Our kernels' weight type for weights stored in f32 (`--dtype bf16` rounds them to bf16);
    /// weights stored in f16 or bf16 stay as stored unless this asks for the other 16-bit type.
    pub cpu_weights: ElemKind,
    /// Host RoPE tables `[max_positions, head_dim / 2]` (CPU kernels).
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    /// The same tables on the device in `dtype` (tensor ops).
    pub cos_t: Tensor,
    pub sin_t: Tensor,
}

/// A projection: packed for the CPU kernels, a `[out, in]` tensor, or candle's quantized
/// matmuls (GGUF types our kernels do not run, or any GGUF type off our CPU kernels), one per
/// part, their outputs concatenated.
pub(crate) enum CandleLinear {
    Packed {
        w: Arc<Matrix>,
        bias: Option<Vec<f32>>,
    },
    Quantized {
        parts: Vec<QMatMul>,
        b: Option<Tensor>,
    },
    Tensor {
        w: Tensor,
        b: Option<Tensor>,
    },
}

impl CandleLinear {
    /// `w` (`[out, inp]`, row-major host f32) for `rt`: packed in f32 for our CPU kernels, else a
    /// tensor on the device in the serving dtype.
    pub fn from_host(w: &[f32], out: usize, inp: usize, rt: &Runtime) -> candle_core::Result<Self> {
        Ok(match rt.cpu {
            Some(_) => Self::Packed {
                // f32 whatever `cpu_weights`: an adapter is small, and its precision is the
                // point of training it.
                w: Arc::new(Matrix::F32(PackedMatrix::pack(w, out, inp))),
                bias: None,
            },
            None => Self::Tensor {
                w: Tensor::from_slice(w, (out, inp), &rt.device)?.to_dtype(rt.dtype)?,
                b: None,
            },
        })
    }
}

/// The embedding table, or the packed output head it is tied to.
pub(crate) enum CandleEmbedding {
    Table(Tensor),
    Packed(Arc<Matrix>),
}

/// Loads the plan's tensors for a [`Runtime`].
pub(crate) struct Loader<'a> {
    pub weights: &'a Weights,
    pub rt: &'a Runtime,
}

fn weights_err(e: candle_core::Error) -> CandleBackendError {
    CandleBackendError::Weights(e.to_string())
}

impl Loader<'_> {
    fn cat(&self, parts: &[TensorSpec]) -> Result<Tensor, CandleBackendError> {
        let parts = parts
            .iter()
            .map(|p| self.weights.get(&p.name, &p.shape))
            .collect::<Result<Vec<_>, _>>()?;
        match parts.as_slice() {
            [one] => Ok(one.clone()),
            _ => Tensor::cat(&parts, 0).map_err(weights_err),
        }
    }

    /// A projection of quantized GGUF tensors: our kernels when every part is one type they
    /// run and the CPU kernels are on, candle's quantized matmuls otherwise; `None` when no
    /// part is quantized.
    fn quantized(
        &self,
        spec: &LinearSpec,
        b: Option<&Tensor>,
    ) -> Result<Option<CandleLinear>, CandleBackendError> {
        let parts = spec
            .parts
            .iter()
            .map(|p| self.weights.quantized(&p.name, &p.shape))
            .collect::<Result<Vec<_>, _>>()?;
        if parts.iter().all(Option::is_none) {
            return Ok(None);
        }
        let kinds: Vec<Option<QuantKind>> = parts
            .iter()
            .map(|p| p.as_ref().and_then(|q| QuantKind::of(q.ggml)))
            .collect();
        if self.rt.cpu.is_some()
            && let Some(Some(kind)) = kinds.first()
            && kinds.iter().all(|k| *k == Some(*kind))
        {
            let mut rows: Vec<&[u8]> = Vec::with_capacity(spec.out);
            for q in parts.iter().flatten() {
                let row = q.bytes.len() / q.shape[0];
                rows.extend(q.bytes.chunks_exact(row));
            }
            let w = QuantMatrix::pack(*kind, &rows, spec.inp).ok_or_else(|| {
                CandleBackendError::Weights(format!(
                    "{}: malformed {kind:?} rows",
                    spec.parts[0].name
                ))
            })?;
            return Ok(Some(CandleLinear::Packed {
                w: Arc::new(Matrix::Quant(w)),
                bias: b.map(host).transpose()?,
            }));
        }
        let parts = spec
            .parts
            .iter()
            .zip(&parts)
            .map(|(p, q)| match q {
                Some(q) => q
                    .to_qtensor(&self.rt.device)
                    .and_then(QMatMul::from_qtensor)
                    .map_err(|e| CandleBackendError::Weights(format!("tensor {}: {e}", p.name))),
                None => Ok(QMatMul::Tensor(
                    self.weights
                        .get(&p.name, &p.shape)?
                        .to_dtype(DType::F32)
                        .map_err(weights_err)?,
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(CandleLinear::Quantized {
            parts,
            b: b.cloned(),
        }))
    }

    /// A projection whose parts are all stored in one 16-bit type, packed as stored (exact:
    /// the kernels widen each weight to f32), unless the runtime asks for the other 16-bit
    /// type; `None` otherwise.
    fn half(&self, spec: &LinearSpec) -> Result<Option<Matrix>, CandleBackendError> {
        let parts = spec
            .parts
            .iter()
            .map(|p| self.weights.host_half(&p.name, &p.shape))
            .collect::<Result<Option<Vec<_>>, _>>()?;
        let Some(parts) = parts else { return Ok(None) };
        let wanted = self.rt.cpu_weights;
        let inp = spec.inp;
        fn pack<E: cpu::Elem>(parts: &[&[E]], inp: usize, out: usize) -> Option<PackedMatrix<E>> {
            let rows: Vec<&[E]> = parts.iter().flat_map(|p| p.chunks_exact(inp)).collect();
            (rows.len() == out).then(|| PackedMatrix::pack_rows(&rows, inp))
        }
        let f16: Option<Vec<_>> = parts.iter().map(HalfValues::f16).collect();
        let bf16: Option<Vec<_>> = parts.iter().map(HalfValues::bf16).collect();
        let w = match (f16, bf16) {
            (Some(p), _) if wanted != ElemKind::Bf16 => pack(&p, inp, spec.out).map(Matrix::F16),
            (_, Some(p)) if wanted != ElemKind::F16 => pack(&p, inp, spec.out).map(Matrix::Bf16),
            _ => return Ok(None),
        };
        w.map(Some).ok_or_else(|| {
            CandleBackendError::Weights(format!(
                "{}: rows do not make {} × {inp}",
                spec.parts[0].name, spec.out
            ))
        })
    }
}

fn host(t: &Tensor) -> Result<Vec<f32>, CandleBackendError> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(weights_err)
}

impl LoadOps for Loader<'_> {
    type Linear = CandleLinear;
    type Vector = Tensor;
    type Embedding = CandleEmbedding;
    type Error = CandleBackendError;

    fn linear(&mut self, spec: &LinearSpec) -> Result<CandleLinear, CandleBackendError> {
        let b = spec.bias.as_ref().map(|b| self.cat(b)).transpose()?;
        if let Some(q) = self.quantized(spec, b.as_ref())? {
            return Ok(q);
        }
        Ok(match self.rt.cpu {
            Some(_) => {
                let bias = b.as_ref().map(host).transpose()?;
                if let Some(w) = self.half(spec)? {
                    return Ok(CandleLinear::Packed {
                        w: Arc::new(w),
                        bias,
                    });
                }
                // Packed from the mapped file: no copy of the weights but the packed one.
                let parts = spec
                    .parts
                    .iter()
                    .map(|p| self.weights.host_f32(&p.name, &p.shape))
                    .collect::<Result<Vec<_>, _>>()?;
                let rows: Vec<&[f32]> = parts
                    .iter()
                    .flat_map(|p| p.chunks_exact(spec.inp))
                    .collect();
                if rows.len() != spec.out {
                    return Err(CandleBackendError::Weights(format!(
                        "{}: {} rows, expected {}",
                        spec.parts[0].name,
                        rows.len(),
                        spec.out
                    )));
                }
                CandleLinear::Packed {
                    w: Arc::new(Matrix::from_f32_rows(&rows, spec.inp, self.rt.cpu_weights)),
                    bias,
                }
            }
            None => CandleLinear::Tensor {
                w: self.cat(&spec.parts)?,
                b,
            },
        })
    }

    fn vector(&mut self, spec: &TensorSpec) -> Result<Tensor, CandleBackendError> {
        self.weights.get(&spec.name, &spec.shape)
    }

    fn embedding(
        &mut self,
        spec: &TensorSpec,
        tied_head: Option<&CandleLinear>,
    ) -> Result<CandleEmbedding, CandleBackendError> {
        Ok(match tied_head {
            Some(CandleLinear::Packed { w, .. }) => CandleEmbedding::Packed(w.clone()),
            Some(CandleLinear::Tensor { w, .. }) => CandleEmbedding::Table(w.clone()),
            Some(CandleLinear::Quantized { .. }) | None => {
                CandleEmbedding::Table(self.weights.get(&spec.name, &spec.shape)?)
            }
        })
    }
}

/// One forward pass over a batch: its chunks, their KV slots (reserved), positions and ids.
pub(crate) struct Step<'s, 'a> {
    rt: &'s Runtime,
    adapter_rows: AdapterRows<'s>,
    chunks: &'s [SeqChunk],
    slots: &'s mut [&'a mut KvSlot<SlotKv>],
    positions: Vec<usize>,
    rows: Vec<usize>,
    /// RoPE rows for the batch's positions (tensor ops), gathered on first use.
    cos_sin: Option<(Tensor, Tensor)>,
}

impl<'s, 'a> Step<'s, 'a> {
    pub fn new(
        rt: &'s Runtime,
        adapter_rows: AdapterRows<'s>,
        batch: &'s infermux_core::ForwardBatch,
        slots: &'s mut [&'a mut KvSlot<SlotKv>],
    ) -> candle_core::Result<Self> {
        let positions = batch
            .chunks
            .iter()
            .flat_map(|c| c.start_pos..c.start_pos + c.tokens.len())
            .collect();
        Ok(Self {
            rt,
            adapter_rows,
            chunks: &batch.chunks,
            slots,
            positions,
            rows: batch.logit_row_indices(),
            cos_sin: None,
        })
    }

    fn n(&self) -> usize {
        self.positions.len()
    }

    fn index(&self, idx: impl Iterator<Item = usize>) -> candle_core::Result<Tensor> {
        let idx: Vec<u32> = idx.map(|i| i as u32).collect();
        let n = idx.len();
        Tensor::from_vec(idx, n, &self.rt.device)
    }

    fn tokens(&self) -> impl Iterator<Item = u32> + '_ {
        self.chunks.iter().flat_map(|c| c.tokens.iter().copied())
    }

    fn cos_sin(&mut self) -> candle_core::Result<(Tensor, Tensor)> {
        if self.cos_sin.is_none() {
            let pos = self.index(self.positions.iter().copied())?;
            let cos = self.rt.cos_t.index_select(&pos, 0)?;
            let sin = self.rt.sin_t.index_select(&pos, 0)?;
            self.cos_sin = Some((cos, sin));
        }
        Ok(self.cos_sin.clone().expect("set above"))
    }

    /// Attention with candle tensor ops, one chunk at a time against its slot's tensors.
    fn attention_tensors(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        shape: AttentionShape,
    ) -> candle_core::Result<Tensor> {
        let AttentionShape {
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
        } = shape;
        let groups = shape.groups();
        let q = (q * shape.scale())?;
        let mut outs = Vec::with_capacity(self.chunks.len());
        let mut offset = 0;
        for (c, slot) in self.chunks.iter().zip(self.slots.iter()) {
            let t = c.tokens.len();
            let SlotKv::Tensors(layers) = &slot.storage else {
                candle_core::bail!("slot {:?} is not held in tensors", c.slot)
            };
            let (kc, vc) = &layers[layer];
            // [t, kv_heads * hd] → [kv_heads, t, hd], written at the slot's position.
            let heads = |x: &Tensor, h: usize| {
                x.narrow(0, offset, t)?
                    .reshape((t, h, hd))?
                    .transpose(0, 1)?
                    .contiguous()
            };
            kc.slice_set(&heads(k, nkv)?, 1, c.start_pos)?;
            vc.slice_set(&heads(v, nkv)?, 1, c.start_pos)?;
            let total = c.start_pos + t;
            let (k_all, v_all) = (kc.narrow(1, 0, total)?, vc.narrow(1, 0, total)?);
            // Grouped-query attention without repeating KV: [nkv, groups * t, hd].
            let qc = heads(&q, nh)?.reshape((nkv, groups * t, hd))?;
            let scores = qc.matmul(&k_all.t()?)?;
            let scores = if t > 1 {
                let mask =
                    causal_mask(t, c.start_pos, &self.rt.device)?.to_dtype(scores.dtype())?;
                scores
                    .reshape((nkv, groups, t, total))?
                    .broadcast_add(&mask)?
                    .reshape((nkv, groups * t, total))?
            } else {
                scores
            };
            let probs = if self.rt.dtype == DType::F32 {
                candle_nn::ops::softmax_last_dim(&scores)?
            } else {
                candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?
                    .to_dtype(self.rt.dtype)?
            };
            let o = probs.matmul(&v_all)?; // [nkv, groups * t, hd]
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

impl LlamaOps for Step<'_, '_> {
    type Tensor = Tensor;
    type Logits = Vec<f32>;
    type Linear = CandleLinear;
    type Vector = Tensor;
    type Embedding = CandleEmbedding;
    type Error = candle_core::Error;

    fn embed(&mut self, table: &CandleEmbedding) -> candle_core::Result<Tensor> {
        match table {
            CandleEmbedding::Table(t) => {
                t.index_select(&self.index(self.tokens().map(|t| t as usize))?, 0)
            }
            CandleEmbedding::Packed(head) => {
                let (x, n) = cpu::packed_rows(head, self.tokens());
                Tensor::from_vec(x, (n, head.inp()), &self.rt.device)
            }
        }
    }

    fn linear(&mut self, x: &Tensor, w: &CandleLinear) -> candle_core::Result<Tensor> {
        match (w, self.rt.cpu) {
            (CandleLinear::Packed { w, bias }, Some(isa)) => {
                x.apply_op1_no_bwd(&cpu::PackedLinear {
                    w,
                    bias: bias.as_deref(),
                    isa,
                })
            }
            (CandleLinear::Tensor { w, b }, _) => {
                if x.dim(0)? == 0 {
                    return Tensor::zeros((0, w.dim(0)?), x.dtype(), x.device());
                }
                let y = x.matmul(&w.t()?)?;
                match b {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
            (CandleLinear::Quantized { parts, b }, _) => {
                let x32 = x.to_dtype(DType::F32)?.contiguous()?;
                let ys = parts
                    .iter()
                    .map(|p| x32.apply(p))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let y = match ys.as_slice() {
                    [one] => one.clone(),
                    _ => Tensor::cat(&ys, 1)?,
                };
                let y = match b {
                    Some(b) => y.broadcast_add(&b.to_dtype(DType::F32)?)?,
                    None => y,
                };
                y.to_dtype(x.dtype())
            }
            (CandleLinear::Packed { .. }, None) => {
                candle_core::bail!("packed weights need the CPU kernels")
            }
        }
    }

    fn linear_add(
        &mut self,
        x: &Tensor,
        w: &CandleLinear,
        residual: Tensor,
    ) -> candle_core::Result<Tensor> {
        match (w, self.rt.cpu) {
            (CandleLinear::Packed { w, bias }, Some(isa)) => x.apply_op2_no_bwd(
                &residual,
                &cpu::PackedLinear {
                    w,
                    bias: bias.as_deref(),
                    isa,
                },
            ),
            _ => {
                let y = self.linear(x, w)?;
                residual + y
            }
        }
    }

    fn lora(
        &mut self,
        x: &Tensor,
        y: Tensor,
        layer: usize,
        site: LoraSite,
    ) -> candle_core::Result<Tensor> {
        let Some((a, b)) = self.adapter_rows.site(layer, site) else {
            return Ok(y);
        };
        let h = self.linear(x, a)?;
        let h = match &self.adapter_rows.mask {
            Some(mask) => (h * mask)?,
            None => h,
        };
        self.linear_add(&h, b, y)
    }

    fn split(&mut self, x: &Tensor, widths: &[usize]) -> candle_core::Result<Vec<Tensor>> {
        let mut start = 0;
        widths
            .iter()
            .map(|&w| {
                let part = x.narrow(1, start, w);
                start += w;
                part
            })
            .collect()
    }

    fn rms_norm(
        &mut self,
        x: &Tensor,
        weight: &Tensor,
        width: usize,
        eps: f64,
    ) -> candle_core::Result<Tensor> {
        if let Some(isa) = self.rt.cpu {
            return x.apply_op2_no_bwd(
                weight,
                &cpu::RmsNorm {
                    width,
                    eps: eps as f32,
                    isa,
                },
            );
        }
        let (n, w) = x.dims2()?;
        let groups = x.contiguous()?.reshape((n * w / width, width))?;
        candle_nn::ops::rms_norm(&groups, weight, eps as f32)?.reshape((n, w))
    }

    fn rope(&mut self, x: &Tensor, head_dim: usize) -> candle_core::Result<Tensor> {
        if self.rt.cpu.is_some() {
            return x.apply_op1_no_bwd(&cpu::Rope {
                head_dim,
                positions: &self.positions,
                cos: &self.rt.cos,
                sin: &self.rt.sin,
            });
        }
        let (n, w) = x.dims2()?;
        let (cos, sin) = self.cos_sin()?;
        let heads = x
            .contiguous()?
            .reshape((n, w / head_dim, head_dim))?
            .transpose(0, 1)?
            .contiguous()?
            .unsqueeze(0)?;
        candle_nn::rotary_emb::rope(&heads, &cos, &sin)?
            .squeeze(0)?
            .transpose(0, 1)?
            .reshape((n, w))
    }

    fn attention(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        shape: AttentionShape,
    ) -> candle_core::Result<Tensor> {
        let Some(isa) = self.rt.cpu else {
            return self.attention_tensors(layer, q, k, v, shape);
        };
        let op = cpu::Attention {
            layer,
            chunks: self.chunks,
            slots: Mutex::new(&mut *self.slots),
            shape,
            isa,
        };
        q.apply_op3_no_bwd(k, v, &op)
    }

    fn swiglu(&mut self, gate_up: &Tensor, inner: usize) -> candle_core::Result<Tensor> {
        if let Some(isa) = self.rt.cpu {
            return gate_up.apply_op1_no_bwd(&cpu::SwiGlu { inner, isa });
        }
        let gate = gate_up.narrow(1, 0, inner)?;
        let up = gate_up.narrow(1, inner, inner)?;
        candle_nn::ops::silu(&gate)? * up
    }

    fn add(&mut self, a: Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
        a + b
    }

    /// On the CPU kernels the packed head writes straight into the returned rows (no tensor and
    /// no second copy of what can be `rows × vocab` floats); otherwise the f32 rows of the tensor.
    fn logits(&mut self, x: &Tensor, head: &CandleLinear) -> candle_core::Result<Vec<f32>> {
        if let (CandleLinear::Packed { w, bias }, Some(isa)) = (head, self.rt.cpu) {
            let (storage, layout) = x.storage_and_layout();
            let candle_core::Storage::Cpu(storage) = &*storage else {
                candle_core::bail!("the CPU kernels need host tensors")
            };
            let op = cpu::PackedLinear {
                w,
                bias: bias.as_deref(),
                isa,
            };
            return op.rows_into_vec(storage, layout);
        }
        let y = self.linear(x, head)?;
        y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
    }

    fn logit_rows(&mut self, x: Tensor) -> candle_core::Result<Tensor> {
        if self.rows.len() == self.n() {
            // Every row (all decode steps, or full-logits chunks): nothing to select.
            return Ok(x);
        }
        let rows = self.index(self.rows.iter().copied())?;
        x.index_select(&rows, 0)
    }
}
