//! Our CPU f32 kernels as candle custom ops (`CustomOp1/2/3`, the mechanism candle-nn's own
//! `rms_norm` and rotary kernels use), for the small batches of decoding.
//!
//! Decode steps are dominated by matmuls with few activation rows — memory-bound sweeps over
//! the weights — and by per-sequence attention over short caches, where candle's general
//! kernels (gemm tuned for large products, one op per chunk for attention) leave most of the
//! bandwidth unused. Here every projection is one multi-threaded sweep over weights packed in
//! panels at load ([`packed::PackedMatrix`]), and attention for all chunks of a batch is one
//! parallel loop that reads each slot's cache in place. Every op reads rows through their
//! layout's stride (a `narrow` of a fused projection costs no copy) and writes contiguous rows.
//!
//! Invariant: every output is computed in the same order whatever the batch (one FMA chain
//! over the input index per matmul output), so a row's logits do not depend on its batch.

pub(crate) mod kernels;
mod packed;
#[cfg_attr(feature = "rayon", allow(dead_code))]
mod pool;
mod quant;

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, bail};
use infermux_core::SeqChunk;
use infermux_core::kv::KvSlot;
use infermux_core::model::AttentionShape;

pub use kernels::Isa;
use kernels::{SyncPtr, par_ranges};
pub(crate) use packed::{Elem, ElemKind, PackedMatrix};
pub(crate) use quant::{QuantKind, QuantMatrix};

/// A projection's weights for the CPU kernels: f32, f16 or bf16 panels, or GGUF blocks
/// ([`quant`]).
pub(crate) enum Matrix {
    F32(PackedMatrix<f32>),
    F16(PackedMatrix<half::f16>),
    Bf16(PackedMatrix<half::bf16>),
    Quant(QuantMatrix),
}

/// `$body` with `$w` bound to the matrix inside any variant.
macro_rules! each_matrix {
    ($m:expr, $w:ident => $body:expr) => {
        match $m {
            Matrix::F32($w) => $body,
            Matrix::F16($w) => $body,
            Matrix::Bf16($w) => $body,
            Matrix::Quant($w) => $body,
        }
    };
}

impl Matrix {
    /// Packs the matrix of `rows` (each `inp` long) in `kind`: f32 rows are kept, or rounded
    /// to the nearest f16/bf16 (`--dtype bf16` on a checkpoint stored in f32).
    pub(crate) fn from_f32_rows(rows: &[&[f32]], inp: usize, kind: ElemKind) -> Self {
        fn narrow<E: packed::Elem>(rows: &[&[f32]], inp: usize, f: fn(f32) -> E) -> Vec<E> {
            rows.iter()
                .flat_map(|r| r[..inp].iter().map(|&v| f(v)))
                .collect()
        }
        let out = rows.len();
        match kind {
            ElemKind::F32 => Self::F32(PackedMatrix::pack_rows(rows, inp)),
            ElemKind::F16 => Self::F16(PackedMatrix::pack(
                &narrow(rows, inp, half::f16::from_f32),
                out,
                inp,
            )),
            ElemKind::Bf16 => Self::Bf16(PackedMatrix::pack(
                &narrow(rows, inp, half::bf16::from_f32),
                out,
                inp,
            )),
        }
    }

    /// Output width.
    pub(crate) fn out(&self) -> usize {
        each_matrix!(self, w => w.out())
    }

    /// Input width.
    pub(crate) fn inp(&self) -> usize {
        each_matrix!(self, w => w.inp())
    }

    /// Row `j` of the unpacked matrix.
    pub(crate) fn row_into(&self, j: usize, dst: &mut [f32]) {
        each_matrix!(self, w => w.row_into(j, dst))
    }

    /// `out[m, out] (+)= x[m, inp] @ wᵀ (+ bias)`.
    pub(crate) fn matmul(
        &self,
        isa: Isa,
        x: &[f32],
        m: usize,
        bias: Option<&[f32]>,
        out: &mut [f32],
        accumulate: bool,
    ) {
        each_matrix!(self, w => w.matmul(isa, x, m, bias, out, accumulate))
    }
}

use crate::kv::SlotKv;

/// Rows of an f32 CPU tensor `[rows, width]` whose rows may be `stride` apart.
struct Rows<'a> {
    data: &'a [f32],
    rows: usize,
    width: usize,
    stride: usize,
}

impl<'a> Rows<'a> {
    fn of(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<Self> {
        let CpuStorage::F32(data) = storage else {
            bail!("infermux cpu ops take f32 tensors")
        };
        let &[rows, width] = layout.dims() else {
            bail!(
                "infermux cpu ops take [rows, width] tensors, got {:?}",
                layout.dims()
            )
        };
        let strides = layout.stride();
        if width > 1 && strides[1] != 1 {
            bail!("infermux cpu ops need unit column stride, got {strides:?}")
        }
        let stride = if rows > 1 { strides[0] } else { width };
        let start = layout.start_offset();
        let end = if rows == 0 {
            start
        } else {
            start + (rows - 1) * stride + width
        };
        if end > data.len() {
            bail!("layout {layout:?} outside its storage")
        }
        Ok(Self {
            data: &data[start..end],
            rows,
            width,
            stride,
        })
    }

    fn row(&self, i: usize) -> &'a [f32] {
        &self.data[i * self.stride..][..self.width]
    }

    /// The rows as one contiguous slice, copying only when they are strided.
    fn contiguous(&self) -> std::borrow::Cow<'a, [f32]> {
        if self.stride == self.width || self.rows <= 1 {
            std::borrow::Cow::Borrowed(&self.data[..self.rows * self.width])
        } else {
            let mut v = Vec::with_capacity(self.rows * self.width);
            for i in 0..self.rows {
                v.extend_from_slice(self.row(i));
            }
            std::borrow::Cow::Owned(v)
        }
    }
}

fn output(data: Vec<f32>, rows: usize, width: usize) -> (CpuStorage, Shape) {
    (CpuStorage::F32(data), Shape::from((rows, width)))
}

/// `x @ wᵀ + b` with `w` packed ([`Matrix`]); as a binary op, `residual + x @ wᵀ + b`.
pub(crate) struct PackedLinear<'a> {
    pub w: &'a Matrix,
    pub bias: Option<&'a [f32]>,
    pub isa: Isa,
}

impl PackedLinear<'_> {
    fn run(
        &self,
        x: &Rows<'_>,
        mut out: Vec<f32>,
        accumulate: bool,
    ) -> candle_core::Result<Vec<f32>> {
        if x.width != self.w.inp() {
            bail!(
                "linear: input width {} but the weight takes {}",
                x.width,
                self.w.inp()
            )
        }
        let xs = x.contiguous();
        self.w
            .matmul(self.isa, &xs, x.rows, self.bias, &mut out, accumulate);
        Ok(out)
    }
}

impl PackedLinear<'_> {
    /// `x @ wᵀ + b` into a plain vector (the output head's logits, handed out without a tensor).
    pub(crate) fn rows_into_vec(
        &self,
        s: &CpuStorage,
        l: &Layout,
    ) -> candle_core::Result<Vec<f32>> {
        let x = Rows::of(s, l)?;
        self.run(&x, vec![0f32; x.rows * self.w.out()], false)
    }
}

impl CustomOp1 for PackedLinear<'_> {
    fn name(&self) -> &'static str {
        "infermux-packed-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = Rows::of(s, l)?;
        let out = self.run(&x, vec![0f32; x.rows * self.w.out()], false)?;
        Ok(output(out, x.rows, self.w.out()))
    }
}

impl CustomOp2 for PackedLinear<'_> {
    fn name(&self) -> &'static str {
        "infermux-packed-linear-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, residual) = (Rows::of(s1, l1)?, Rows::of(s2, l2)?);
        if residual.rows != x.rows || residual.width != self.w.out() {
            bail!(
                "linear_add: residual is {}x{}",
                residual.rows,
                residual.width
            )
        }
        let out = self.run(&x, residual.contiguous().into_owned(), true)?;
        Ok(output(out, x.rows, self.w.out()))
    }
}

/// RMS norm of every `width` values of each row, scaled by the weight (`[width]`).
pub(crate) struct RmsNorm {
    pub width: usize,
    pub eps: f32,
    pub isa: Isa,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "infermux-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = Rows::of(s1, l1)?;
        let CpuStorage::F32(w) = s2 else {
            bail!("rms_norm weight must be f32")
        };
        let w = &w[l2.start_offset()..][..self.width];
        if !x.width.is_multiple_of(self.width) {
            bail!(
                "rms_norm: row width {} is not a multiple of {}",
                x.width,
                self.width
            )
        }
        let mut out = vec![0f32; x.rows * x.width];
        for (i, o) in out.chunks_exact_mut(x.width.max(1)).enumerate() {
            kernels::rms_norm(self.isa, x.row(i), w, self.eps, o);
        }
        Ok(output(out, x.rows, x.width))
    }
}

/// RoPE of every `head_dim` values of each row at that row's position.
pub(crate) struct Rope<'a> {
    pub head_dim: usize,
    pub positions: &'a [usize],
    /// `[max_positions, head_dim / 2]` tables.
    pub cos: &'a [f32],
    pub sin: &'a [f32],
}

impl CustomOp1 for Rope<'_> {
    fn name(&self) -> &'static str {
        "infermux-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = Rows::of(s, l)?;
        let half = self.head_dim / 2;
        if x.rows != self.positions.len() || !x.width.is_multiple_of(self.head_dim) {
            bail!(
                "rope: {}x{} rows for {} positions",
                x.rows,
                x.width,
                self.positions.len()
            )
        }
        let mut out = x.contiguous().into_owned();
        for (row, &pos) in out.chunks_exact_mut(x.width.max(1)).zip(self.positions) {
            let (cos, sin) = (
                &self.cos[pos * half..][..half],
                &self.sin[pos * half..][..half],
            );
            for head in row.chunks_exact_mut(self.head_dim) {
                kernels::rope(head, cos, sin);
            }
        }
        Ok(output(out, x.rows, x.width))
    }
}

/// `silu(gate) * up` of rows laid out `[gate | up]`.
pub(crate) struct SwiGlu {
    pub inner: usize,
    pub isa: Isa,
}

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "infermux-swiglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = Rows::of(s, l)?;
        let inner = self.inner;
        if x.width != 2 * inner {
            bail!("swiglu: row width {} is not 2 × {inner}", x.width)
        }
        let n = x.rows;
        let mut act = vec![0f32; n * inner];
        let rows_per = (4096 / inner.max(1)).max(1);
        let act_ptr = SyncPtr(act.as_mut_ptr());
        let isa = self.isa;
        par_ranges(
            n,
            if n * inner < 1 << 16 {
                n.max(1)
            } else {
                rows_per
            },
            |rows| {
                for r in rows {
                    let row = x.row(r);
                    // SAFETY: row r of `act` (inside its n × inner floats) is written by this range
                    // only, and `act` outlives the parallel call.
                    let o = unsafe {
                        std::slice::from_raw_parts_mut(act_ptr.get().add(r * inner), inner)
                    };
                    kernels::swiglu(isa, &row[..inner], &row[inner..], o);
                }
            },
        );
        Ok(output(act, n, inner))
    }
}

/// One layer's keys and values of one slot, in host memory: `[kv_heads, capacity, head_dim]`.
pub(crate) type HostLayerKv = (Vec<f32>, Vec<f32>);

/// Attention of every chunk of a batch against its slot (keys and values of the chunk are
/// appended first): a ternary op on `q`, `k`, `v` rows, writing the slots' host caches.
pub(crate) struct Attention<'s, 'a> {
    pub layer: usize,
    pub chunks: &'s [SeqChunk],
    /// The chunks' slots, in chunk order; written by the op.
    pub slots: Mutex<&'s mut [&'a mut KvSlot<SlotKv>]>,
    pub shape: AttentionShape,
    pub isa: Isa,
}

/// Queries of one chunk scored together against one KV head's keys.
const QUERY_BLOCK: usize = 16;

impl CustomOp3 for Attention<'_, '_> {
    fn name(&self) -> &'static str {
        "infermux-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (q, k, v) = (Rows::of(s1, l1)?, Rows::of(s2, l2)?, Rows::of(s3, l3)?);
        let AttentionShape {
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
        } = self.shape;
        let (q_out, kv_out) = (nh * hd, nkv * hd);
        let n = q.rows;
        if q.width != q_out || k.width != kv_out || v.width != kv_out || k.rows != n || v.rows != n
        {
            bail!("attention: q/k/v shapes do not match the head layout")
        }
        let groups = self.shape.groups();
        let scale = self.shape.scale() as f32;
        let li = self.layer;
        let mut guard = self
            .slots
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention slots poisoned".into()))?;
        let slots: &mut [&mut KvSlot<SlotKv>] = &mut guard;
        if slots.len() != self.chunks.len() {
            bail!(
                "attention: {} slots for {} chunks",
                slots.len(),
                self.chunks.len()
            )
        }

        // Write the new keys and values, and list the work: (chunk, kv head, query block).
        let mut offsets = Vec::with_capacity(self.chunks.len());
        let mut units = Vec::new();
        let mut offset = 0;
        for (ci, (c, slot)) in self.chunks.iter().zip(slots.iter_mut()).enumerate() {
            let t = c.tokens.len();
            let cap = slot.capacity;
            if c.start_pos + t > cap {
                bail!("attention: slot {:?} has no room reserved", c.slot)
            }
            let SlotKv::Host(layers) = &mut slot.storage else {
                bail!("attention: slot {:?} is not in host memory", c.slot)
            };
            let (kc, vc) = &mut layers[li];
            for i in 0..t {
                let (krow, vrow) = (k.row(offset + i), v.row(offset + i));
                for g in 0..nkv {
                    let dst = (g * cap + c.start_pos + i) * hd;
                    kc[dst..dst + hd].copy_from_slice(&krow[g * hd..][..hd]);
                    vc[dst..dst + hd].copy_from_slice(&vrow[g * hd..][..hd]);
                }
            }
            for g in 0..nkv {
                for q0 in (0..t).step_by(QUERY_BLOCK) {
                    units.push((ci, g, q0..(q0 + QUERY_BLOCK).min(t)));
                }
            }
            offsets.push(offset);
            offset += t;
        }
        if offset != n {
            bail!("attention: chunks hold {offset} tokens, q has {n} rows")
        }
        let caches: Vec<(&[f32], &[f32], usize)> = slots
            .iter()
            .map(|s| match &s.storage {
                SlotKv::Host(layers) => (&layers[li].0[..], &layers[li].1[..], s.capacity),
                SlotKv::Tensors(_) => (&[][..], &[][..], 0),
            })
            .collect();
        let mut out = vec![0f32; n * q_out];
        let dst = SyncPtr(out.as_mut_ptr());
        let isa = self.isa;
        let chunks = self.chunks;
        par_ranges(units.len(), 1, |range| {
            let (mut qs, mut scores) = (Vec::new(), Vec::new());
            for (ci, g, queries) in units[range].iter().cloned() {
                let c = &chunks[ci];
                let (kc, vc, cap) = caches[ci];
                let keys = &kc[g * cap * hd..];
                let values = &vc[g * cap * hd..];
                // The block's queries of this KV head's `groups` heads, as contiguous rows.
                let rows = queries.len() * groups;
                qs.clear();
                for i in queries.clone() {
                    qs.extend_from_slice(&q.row(offsets[ci] + i)[g * groups * hd..][..groups * hd]);
                }
                // Scores against every key any query of the block may see; each query then
                // uses only its causal prefix.
                let seen = c.start_pos + queries.end;
                scores.clear();
                scores.resize(rows * seen, 0.0);
                kernels::matmul_serial(isa, &qs, rows, hd, &keys[..seen * hd], seen, &mut scores);
                for (bi, i) in queries.enumerate() {
                    let tok = offsets[ci] + i;
                    let total = c.start_pos + i + 1;
                    for qh in 0..groups {
                        let sc = &mut scores[(bi * groups + qh) * seen..][..total];
                        let mut max = f32::NEG_INFINITY;
                        for x in sc.iter_mut() {
                            *x *= scale;
                            max = max.max(*x);
                        }
                        for x in sc.iter_mut() {
                            *x -= max;
                        }
                        kernels::exp_inplace(isa, sc);
                        let inv = 1.0 / sc.iter().sum::<f32>();
                        for x in sc.iter_mut() {
                            *x *= inv;
                        }
                        let head = g * groups + qh;
                        // SAFETY: head `head` of token `tok` (inside the n × q_out output) is
                        // written by this unit only, and `out` outlives the parallel call.
                        let o = unsafe {
                            std::slice::from_raw_parts_mut(
                                dst.get().add(tok * q_out + head * hd),
                                hd,
                            )
                        };
                        kernels::weighted_sum(isa, sc, values, o);
                    }
                }
            }
        });
        Ok(output(out, n, q_out))
    }
}

/// Embedding rows read out of a packed (tied) output head.
pub(crate) fn packed_rows(
    head: &Arc<Matrix>,
    tokens: impl Iterator<Item = u32>,
) -> (Vec<f32>, usize) {
    let h = head.inp();
    let mut x = Vec::new();
    let mut n = 0;
    for t in tokens {
        let start = x.len();
        x.resize(start + h, 0.0);
        head.row_into(t as usize, &mut x[start..]);
        n += 1;
    }
    (x, n)
}
