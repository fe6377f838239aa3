//! Block-quantized weights (GGUF `Q8_0`, `Q5_0`, `Q5_1`, `Q4_0`, `Q4_1`) and their matmul, as
//! llama.cpp does it:
//! activations quantized per 32-value block to int8 with a scale (and the scaled sum of the
//! block, for the weights' offsets), integer dot products per block, scaled and summed in f32.
//!
//! Every type is held as unsigned 8- or 4-bit values `u` with a scale `d` and an offset `m` per
//! block (`w = d·u + m`): `Q4_1` and `Q5_1` as stored, `Q4_0` with `m = −8d`, `Q5_0` with
//! `m = −16d`, `Q8_0` shifted by 128 with `m = −128d` (all exact: powers of two times an f16).
//! A block's contribution to `x·w` is then `d·d_x·Σ u·q_x + m·s_x`, where `q_x` are the
//! activation's int8 values, `d_x` its scale and `s_x ≈ d_x·Σ q_x` its scaled sum (made as
//! llama.cpp makes them: [`QuantActs::new`]): one unsigned-by-signed integer dot product
//! (AVX-512 VNNI's `vpdpbusd`) per block, whatever the type.
//!
//! Rows are stored by tiles of four, each tile in the order the decode kernel reads it, so a
//! step streams the matrix front to back (the hardware prefetcher follows one stream; with four
//! rows read side by side, scales first, decode ran at ~40% of the bandwidth limit). Blocks are
//! padded to an even count and taken in groups of up to 16: per group, the four rows' f16
//! scales `d`, then their offsets `m` (16 blocks' scales convert in one instruction), then per
//! pair of blocks the four rows' values (two blocks fill one 512-bit register). Activations are
//! stored in the matching order: a pair of blocks as `[b₀ 0..16, b₁ 0..16, b₀ 16..32,
//! b₁ 16..32]`, the order two blocks' nibbles unpack in (4-bit types keep GGUF's nibble
//! layout; the bytes of Q8_0 and of the 5-bit types, whose high bits are joined to their
//! nibbles at load, are stored in that order).
//!
//! Few activation rows (decode) read the packed rows directly, decoding nibbles in registers:
//! a step then reads each weight byte once, as stored. Many rows (prefill) unpack a tile of
//! weight rows once and run every activation row over it. Both produce the same bytes and
//! scales and run the same sequence of operations on them, so a row's result does not depend
//! on its batch.

use half::f16;
use infermux_core::model::gguf::GgmlType;

use super::kernels::{Isa, SyncPtr, par_ranges, threads};

/// Values per block.
const QK: usize = 32;
/// Weight rows unpacked together: each activation block is loaded once for all of them.
const TILE: usize = 4;
/// From this many activation rows on, a tile of weight rows is unpacked once for all of them
/// instead of decoding the packed rows for each (decode runs below it, prefill above).
const UNPACK_ROWS: usize = 16;

/// Which block type a [`QuantMatrix`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QuantKind {
    Q8_0,
    Q5_0,
    Q5_1,
    Q4_0,
    Q4_1,
}

impl QuantKind {
    /// The kind of a ggml type, if our kernels run it.
    pub(crate) fn of(t: GgmlType) -> Option<Self> {
        Some(match t {
            GgmlType::Q8_0 => Self::Q8_0,
            GgmlType::Q5_0 => Self::Q5_0,
            GgmlType::Q5_1 => Self::Q5_1,
            GgmlType::Q4_0 => Self::Q4_0,
            GgmlType::Q4_1 => Self::Q4_1,
            _ => return None,
        })
    }

    /// Whether `u` is held one byte per value (8- and 5-bit types) rather than as nibbles.
    fn byte_values(self) -> bool {
        matches!(self, Self::Q8_0 | Self::Q5_0 | Self::Q5_1)
    }

    /// Whether the offsets `m` are stored (Q4_1, Q5_1), not `−k·d`: llama.cpp then pairs the
    /// weights with Q8_1 activations, whose block sum is rounded to f16.
    fn stored_offsets(self) -> bool {
        matches!(self, Self::Q4_1 | Self::Q5_1)
    }

    /// Bytes of `u` per block as stored.
    fn qs_bytes(self) -> usize {
        if self.byte_values() { 32 } else { 16 }
    }

    /// Bytes of one GGUF block.
    fn gguf_block(self) -> usize {
        match self {
            Self::Q8_0 => 34,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
        }
    }
}

/// An `[out, inp]` matrix of quantized rows, in tiles of [`TILE`] rows (the last one padded
/// with zero rows) laid out as the module docs say.
pub(crate) struct QuantMatrix {
    kind: QuantKind,
    out: usize,
    inp: usize,
    /// Blocks per row, padded to even.
    nb: usize,
    /// Bytes per tile.
    tile_bytes: usize,
    data: Vec<u8>,
}

fn f16_at(b: &[u8], i: usize) -> f16 {
    f16::from_le_bytes([b[i], b[i + 1]])
}

/// Where one group of up to 16 blocks lies inside a tile: from byte `base`, `len` blocks of
/// `qs` value bytes per row.
#[derive(Clone, Copy)]
struct Group {
    base: usize,
    len: usize,
    qs: usize,
}

impl Group {
    /// The group holding block `b` of rows with `nb` blocks of `qs` value bytes.
    #[inline]
    fn of(b: usize, nb: usize, qs: usize) -> Self {
        let g = b / 16 * 16;
        Self {
            base: g * TILE * (qs + 4),
            len: (nb - g).min(16),
            qs,
        }
    }

    /// Row `c`'s f16 scales of the group's blocks.
    #[inline]
    fn scales(self, c: usize) -> usize {
        self.base + c * self.len * 2
    }

    /// Row `c`'s f16 offsets of the group's blocks.
    #[inline]
    fn offsets(self, c: usize) -> usize {
        self.base + (TILE + c) * self.len * 2
    }

    /// Row `c`'s values of pair `p` (blocks 2p, 2p + 1 of the group).
    #[inline]
    fn pair(self, p: usize, c: usize) -> usize {
        self.base + TILE * self.len * 4 + (p * TILE + c) * 2 * self.qs
    }
}

impl QuantMatrix {
    /// Packs `rows`, each one GGUF row of `inp` values in `kind`'s blocks (`inp` a multiple of
    /// 32); `None` when a row has the wrong length.
    pub(crate) fn pack(kind: QuantKind, rows: &[&[u8]], inp: usize) -> Option<Self> {
        if inp == 0 || !inp.is_multiple_of(QK) {
            return None;
        }
        let blocks = inp / QK;
        let nb = blocks.next_multiple_of(2);
        let qs = kind.qs_bytes();
        let tile_bytes = TILE * nb * (qs + 4);
        let mut data = super::packed::zeroed(rows.len().div_ceil(TILE) * tile_bytes);
        for (j, row) in rows.iter().enumerate() {
            if row.len() != blocks * kind.gguf_block() {
                return None;
            }
            let (tile, c) = (&mut data[j / TILE * tile_bytes..][..tile_bytes], j % TILE);
            for (b, block) in row.chunks_exact(kind.gguf_block()).enumerate() {
                let d = f16_at(block, 0);
                let (m, q) = match kind {
                    QuantKind::Q8_0 => (f16::from_f32(-128.0 * d.to_f32()), &block[2..]),
                    QuantKind::Q5_0 => (f16::from_f32(-16.0 * d.to_f32()), &block[2..]),
                    QuantKind::Q4_0 => (f16::from_f32(-8.0 * d.to_f32()), &block[2..]),
                    QuantKind::Q5_1 | QuantKind::Q4_1 => (f16_at(block, 2), &block[4..]),
                };
                let group = Group::of(b, nb, qs);
                let (i, p) = (b % 16, b % 16 / 2);
                let values = &mut tile[group.pair(p, c)..][..2 * qs];
                if kind.byte_values() {
                    // Pair-interleaved bytes: int8 → uint8 by flipping the sign bit (q + 128);
                    // 5-bit: each nibble joined to its high bit from `qh`.
                    for (k, v) in byte_values(kind, q).into_iter().enumerate() {
                        values[interleaved(b % 2, k)] = v;
                    }
                } else {
                    values[b % 2 * qs..][..qs].copy_from_slice(q);
                }
                tile[group.scales(c) + 2 * i..][..2].copy_from_slice(&d.to_le_bytes());
                tile[group.offsets(c) + 2 * i..][..2].copy_from_slice(&m.to_le_bytes());
            }
        }
        Some(Self {
            kind,
            out: rows.len(),
            inp,
            nb,
            tile_bytes,
            data,
        })
    }

    /// Output width.
    pub(crate) fn out(&self) -> usize {
        self.out
    }

    /// Input width.
    pub(crate) fn inp(&self) -> usize {
        self.inp
    }

    /// Tile `t`'s bytes.
    fn tile(&self, t: usize) -> &[u8] {
        &self.data[t * self.tile_bytes..][..self.tile_bytes]
    }

    /// Row `j`'s unsigned values (pairs of blocks interleaved as the activations are),
    /// scales and offsets, into `u` (`nb × 32`), `d` and `m` (`nb` each).
    fn unpack_row(&self, j: usize, u: &mut [u8], d: &mut [f32], m: &mut [f32]) {
        let (tile, c) = (self.tile(j / TILE), j % TILE);
        let qs = self.kind.qs_bytes();
        for b in 0..self.nb {
            let group = Group::of(b, self.nb, qs);
            let i = b % 16;
            d[b] = f16_at(tile, group.scales(c) + 2 * i).to_f32();
            m[b] = f16_at(tile, group.offsets(c) + 2 * i).to_f32();
            let pair = &tile[group.pair(i / 2, c)..][..2 * qs];
            if self.kind.byte_values() {
                if b % 2 == 0 {
                    u[b * QK..][..2 * QK].copy_from_slice(pair);
                }
            } else {
                let src = &pair[b % 2 * qs..][..qs];
                let (first, second) = (interleaved(b, 0), interleaved(b, 16));
                for i in 0..16 {
                    u[first + i] = src[i] & 0x0f;
                    u[second + i] = src[i] >> 4;
                }
            }
        }
    }

    /// Row `j` dequantized (an embedding lookup in a tied output head).
    pub(crate) fn row_into(&self, j: usize, dst: &mut [f32]) {
        let mut u = vec![0u8; self.nb * QK];
        let (mut d, mut m) = (vec![0f32; self.nb], vec![0f32; self.nb]);
        self.unpack_row(j, &mut u, &mut d, &mut m);
        for (i, o) in dst[..self.inp].iter_mut().enumerate() {
            let b = i / QK;
            *o = d[b] * u[interleaved(b, i % QK)] as f32 + m[b];
        }
    }

    /// `out[m, self.out] (+)= x[m, self.inp] @ wᵀ (+ bias)`; `accumulate` adds to `out`.
    pub(crate) fn matmul(
        &self,
        isa: Isa,
        x: &[f32],
        rows: usize,
        bias: Option<&[f32]>,
        out: &mut [f32],
        accumulate: bool,
    ) {
        let (n, k) = (self.out, self.inp);
        assert!(x.len() >= rows * k && out.len() >= rows * n);
        if let Some(b) = bias {
            assert!(b.len() >= n);
        }
        if rows == 0 || n == 0 {
            return;
        }
        let acts = QuantActs::new(isa, x, rows, k, self.nb, self.kind.stored_offsets());
        let tiles = n.div_ceil(TILE);
        let grain = tiles.div_ceil(threads() * 8).max(1);
        let dst = SyncPtr(out.as_mut_ptr());
        let vnni = isa.avx512() && vnni_available();
        #[cfg(target_arch = "x86_64")]
        if vnni && rows < UNPACK_ROWS {
            par_ranges(tiles, grain, |range| {
                let mut acc = [0f32; TILE];
                for t in range {
                    let j0 = t * TILE;
                    let cols = TILE.min(n - j0);
                    let w = Packed { w: self, j0, cols };
                    for r in 0..rows {
                        // SAFETY: AVX-512F/BW/VL/VNNI and F16C were detected at run time.
                        unsafe { avx512::dot_tile_packed(&w, &acts, r, &mut acc) };
                        // SAFETY: as below.
                        unsafe { store(dst, &acc, r, n, j0, cols, bias, accumulate) };
                    }
                }
            });
            return;
        }
        par_ranges(tiles, grain, |range| {
            let nb = self.nb;
            let mut u = vec![0u8; TILE * nb * QK];
            let mut d = vec![0f32; TILE * nb];
            let mut m = vec![0f32; TILE * nb];
            let mut acc = [0f32; TILE];
            for t in range {
                let j0 = t * TILE;
                let cols = TILE.min(n - j0);
                for c in 0..cols {
                    self.unpack_row(
                        j0 + c,
                        &mut u[c * nb * QK..][..nb * QK],
                        &mut d[c * nb..][..nb],
                        &mut m[c * nb..][..nb],
                    );
                }
                let w = Unpacked {
                    u: &u,
                    d: &d,
                    m: &m,
                    nb,
                    cols,
                };
                for r in 0..rows {
                    #[cfg(target_arch = "x86_64")]
                    if vnni {
                        // SAFETY: AVX-512F/BW/VNNI and F16C were detected at run time.
                        unsafe { avx512::dot_tile(&w, &acts, r, &mut acc) };
                    } else {
                        dot_tile_portable(&w, &acts, r, &mut acc);
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    {
                        let _ = vnni;
                        dot_tile_portable(&w, &acts, r, &mut acc);
                    }
                    // SAFETY: columns j0..j0 + cols of every row belong to tile t, which only
                    // this range writes, and lie inside `rows * n` (asserted above).
                    unsafe { store(dst, &acc, r, n, j0, cols, bias, accumulate) };
                }
            }
        });
    }
}

/// Writes (or adds) one activation row's results for a tile's columns, plus the bias.
///
/// # Safety
/// `dst` must point at `rows * n` floats with `r < rows`, `j0 + cols <= n`, and no other
/// thread may touch those columns of that row meanwhile.
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn store(
    dst: SyncPtr,
    acc: &[f32; TILE],
    r: usize,
    n: usize,
    j0: usize,
    cols: usize,
    bias: Option<&[f32]>,
    accumulate: bool,
) {
    for (c, &v) in acc.iter().enumerate().take(cols) {
        let j = j0 + c;
        let v = v + bias.map_or(0.0, |b| b[j]);
        // SAFETY: inside `rows * n` and owned by this caller (the function's contract).
        unsafe {
            let o = dst.get().add(r * n + j);
            *o = if accumulate { *o + v } else { v };
        }
    }
}

/// A tile of weight rows read where they are stored (no unpacking).
struct Packed<'a> {
    w: &'a QuantMatrix,
    j0: usize,
    cols: usize,
}

/// Whether the CPU has AVX-512 VNNI (with BW, VL) and F16C for [`avx512::dot_tile`].
fn vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// A tile of weight rows unpacked: `cols` rows of `nb × 32` values, scales, offsets.
struct Unpacked<'a> {
    u: &'a [u8],
    d: &'a [f32],
    m: &'a [f32],
    nb: usize,
    cols: usize,
}

/// Activation rows quantized per block: int8 values (pairs of blocks in the unpack order of
/// the module docs), scales `d` and scaled sums `s` per block, zero past the row's end.
struct QuantActs {
    q: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

/// The 32 unsigned values of a byte-valued block (`q`: the block past its scales).
fn byte_values(kind: QuantKind, q: &[u8]) -> [u8; QK] {
    match kind {
        QuantKind::Q8_0 => std::array::from_fn(|k| q[k] ^ 0x80),
        _ => {
            let qh = u32::from_le_bytes([q[0], q[1], q[2], q[3]]);
            let qs = &q[4..];
            std::array::from_fn(|k| {
                let nibble = if k < 16 {
                    qs[k] & 0x0f
                } else {
                    qs[k - 16] >> 4
                };
                nibble | (((qh >> k) & 1) as u8) << 4
            })
        }
    }
}

/// Position of element `i` of block `b` in a pair-interleaved row.
#[inline]
fn interleaved(b: usize, i: usize) -> usize {
    let pair = b / 2 * 2 * QK;
    let half = if i < 16 { 0 } else { 32 };
    pair + half + (b % 2) * 16 + (i % 16)
}

impl QuantActs {
    /// Quantizes `rows` rows of `k` exactly as llama.cpp's `quantize_row_q8_0` / `_q8_1` do on
    /// x86 (a dot product then equals llama.cpp's up to f32 rounding; each of these choices
    /// moved logprobs by up to ~0.2 against it): `q = round_half_even(x · 127/amax)`, the scale
    /// `d = amax/127` used rounded to f16, and with `f16_sums` (Q8_1, for stored offsets) the
    /// block sum `s = f16(d · Σq)` with the unrounded `d`; otherwise `s = f16(d) · Σq`, so
    /// that `m·s` cancels the `−k·d` offset of the symmetric types to f32 rounding.
    fn new(isa: Isa, x: &[f32], rows: usize, k: usize, nb: usize, f16_sums: bool) -> Self {
        let mut acts = Self {
            q: vec![0i8; rows * nb * QK],
            d: vec![0f32; rows * nb],
            s: vec![0f32; rows * nb],
        };
        let parts = acts
            .q
            .chunks_exact_mut(nb * QK)
            .zip(acts.d.chunks_exact_mut(nb))
            .zip(acts.s.chunks_exact_mut(nb));
        for (r, ((q, d), s)) in parts.enumerate() {
            let row = &x[r * k..][..k];
            #[cfg(target_arch = "x86_64")]
            if isa.avx512() {
                // SAFETY: AVX-512F was detected at run time (`isa`).
                unsafe { quantize_row_avx512(row, q, d, s, f16_sums) };
                continue;
            }
            let _ = isa;
            quantize_row(row, q, d, s, f16_sums);
        }
        acts
    }
}

/// [`quantize_row`] compiled for AVX-512, where the rounding and conversions vectorize
/// (`vrndscaleps`; the baseline build calls libm per value, which made prefill's activation
/// quantization, one thread per call, about as slow as its dot products).
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_row_avx512(
    row: &[f32],
    q: &mut [i8],
    d: &mut [f32],
    s: &mut [f32],
    f16_sums: bool,
) {
    quantize_row(row, q, d, s, f16_sums);
}

/// One activation row into its blocks' int8 values (pair-interleaved), scales and sums.
#[inline(always)]
fn quantize_row(row: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [f32], f16_sums: bool) {
    for (b, block) in row.chunks(QK).enumerate() {
        let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        let mut values = [0i8; QK];
        for (o, &v) in values.iter_mut().zip(block) {
            *o = (v * inv).round_ties_even() as i8;
        }
        let sum: i32 = values.iter().map(|&v| v as i32).sum();
        let pair = &mut q[b / 2 * 2 * QK..][..2 * QK];
        let half = b % 2 * 16;
        pair[half..][..16].copy_from_slice(&values[..16]);
        pair[32 + half..][..16].copy_from_slice(&values[16..]);
        let rounded = f16::from_f32(scale).to_f32();
        d[b] = rounded;
        s[b] = if f16_sums {
            f16::from_f32(scale * sum as f32).to_f32()
        } else {
            rounded * sum as f32
        };
    }
}

/// `acc[c] = x_r · w_c` for the tile's rows, in plain Rust.
fn dot_tile_portable(w: &Unpacked<'_>, a: &QuantActs, r: usize, acc: &mut [f32; TILE]) {
    let nb = w.nb;
    let q = &a.q[r * nb * QK..][..nb * QK];
    for (c, out) in acc.iter_mut().enumerate().take(w.cols) {
        let u = &w.u[c * nb * QK..][..nb * QK];
        let mut total = 0f32;
        for b in 0..nb {
            let at = |i| interleaved(b, i);
            let dot: i32 = (0..QK).map(|i| u[at(i)] as i32 * q[at(i)] as i32).sum();
            total +=
                w.d[c * nb + b] * a.d[r * nb + b] * dot as f32 + w.m[c * nb + b] * a.s[r * nb + b];
        }
        *out = total;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Group, Packed, QK, QuantActs, TILE, Unpacked};

    /// One kernel body over two weight sources: `$scales(c, g, mask)` gives row c's scales
    /// and offsets of blocks g.., `$u(c, b)` the 64 unsigned values of blocks b, b + 1. Both
    /// sources yield the same values, and the body runs the same operations on them.
    ///
    /// Per pair of blocks, one 64-byte `vpdpbusd` per weight row, scaled per block by a
    /// permute of 16 blocks' scales.
    macro_rules! dot_body {
        ($a:ident, $r:ident, $acc:ident, $nb:expr, $cols:expr, $scales:expr, $u:expr) => {{
            let nb = $nb;
            let cols = $cols;
            let q = &$a.q[$r * nb * QK..][..nb * QK];
            let (ad, as_) = (&$a.d[$r * nb..][..nb], &$a.s[$r * nb..][..nb]);
            // Lane l of a pair's dot product belongs to block 2p + (l / 4) % 2.
            let lane_block = _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0);
            let mut sums = [_mm512_setzero_ps(); TILE];
            let mut mins = [_mm512_setzero_ps(); TILE];
            let mut g = 0;
            while g < nb {
                // A group of up to 16 blocks (8 pairs; `nb` is even).
                let len = (nb - g).min(16);
                let mask: __mmask16 = if len == 16 { 0xffff } else { (1u16 << len) - 1 };
                let mut scale = [_mm512_setzero_ps(); TILE];
                // SAFETY: the masked loads read lanes g..g + len, inside `ad` and `as_` (nb
                // each); `$scales` reads row c's lanes g..g + len of its nb scales and offsets.
                unsafe {
                    let adv = _mm512_maskz_loadu_ps(mask, ad.as_ptr().add(g));
                    let asv = _mm512_maskz_loadu_ps(mask, as_.as_ptr().add(g));
                    for c in 0..cols {
                        let (dv, mv) = $scales(c, g, mask);
                        scale[c] = _mm512_mul_ps(dv, adv);
                        mins[c] = _mm512_fmadd_ps(mv, asv, mins[c]);
                    }
                }
                for p in 0..len / 2 {
                    let b = g + 2 * p;
                    let idx = _mm512_add_epi32(lane_block, _mm512_set1_epi32(2 * p as i32));
                    // SAFETY: blocks b and b + 1 (b + 1 < nb) are the 64 bytes at b·32 of the
                    // activation row, and `$u` reads the same blocks of weight row c.
                    unsafe {
                        let av = _mm512_loadu_si512(q.as_ptr().add(b * QK).cast());
                        for c in 0..cols {
                            let wv = $u(c, b);
                            let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, av);
                            let s = _mm512_permutexvar_ps(idx, scale[c]);
                            sums[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, sums[c]);
                        }
                    }
                }
                g += len;
            }
            for c in 0..cols {
                $acc[c] = _mm512_reduce_add_ps(sums[c]) + _mm512_reduce_add_ps(mins[c]);
            }
        }};
    }

    /// `acc[c] = x_r · w_c` over an unpacked tile.
    ///
    /// # Safety
    /// The CPU must support AVX-512F, AVX-512BW, AVX-512VL, AVX-512 VNNI and F16C.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    pub(super) unsafe fn dot_tile(
        w: &Unpacked<'_>,
        a: &QuantActs,
        r: usize,
        acc: &mut [f32; TILE],
    ) {
        let nb = w.nb;
        assert!(
            w.u.len() >= w.cols * nb * QK && w.d.len() >= w.cols * nb && w.m.len() >= w.cols * nb
        );
        // SAFETY: the closures read row c's lanes g..g + len of its nb scales and
        // offsets, and the 64 bytes of its blocks b, b + 1, inside the sizes asserted above.
        let scales = |c: usize, g: usize, mask: __mmask16| unsafe {
            (
                _mm512_maskz_loadu_ps(mask, w.d.as_ptr().add(c * nb + g)),
                _mm512_maskz_loadu_ps(mask, w.m.as_ptr().add(c * nb + g)),
            )
        };
        // SAFETY: see above.
        let values = |c: usize, b: usize| unsafe {
            _mm512_loadu_si512(w.u.as_ptr().add(c * nb * QK + b * QK).cast())
        };
        dot_body!(a, r, acc, nb, w.cols, scales, values);
    }

    /// `acc[c] = x_r · w_c` reading the tile's rows where they are stored: 4-bit values are
    /// split into nibbles in registers (a pair of blocks' 32 bytes hold, low nibbles then high
    /// ones, exactly the activation's pair order), scales converted from f16.
    ///
    /// # Safety
    /// The CPU must support AVX-512F, AVX-512BW, AVX-512VL, AVX-512 VNNI and F16C.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    pub(super) unsafe fn dot_tile_packed(
        w: &Packed<'_>,
        a: &QuantActs,
        r: usize,
        acc: &mut [f32; TILE],
    ) {
        let m = w.w;
        let nb = m.nb;
        let qs = m.kind.qs_bytes();
        assert!(w.j0.is_multiple_of(TILE) && w.j0 + w.cols <= m.out);
        let tile = m.tile(w.j0 / TILE).as_ptr();
        let low = _mm512_set1_epi8(0x0f);
        // SAFETY: for the closures' reads: a tile holds, per group of `len` blocks, TILE rows'
        // `len` f16 scales and offsets and per pair TILE rows' 2·qs value bytes (module docs,
        // `Group`); the masked loads read lanes 0..len of row c's scales and offsets of group
        // g, the value loads the 32 (4-bit) or 64 (byte-valued) bytes of blocks b, b + 1 of row c.
        let scales = |c: usize, g: usize, mask: __mmask16| unsafe {
            let group = Group::of(g, nb, qs);
            (
                _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                    mask,
                    tile.add(group.scales(c)).cast(),
                )),
                _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                    mask,
                    tile.add(group.offsets(c)).cast(),
                )),
            )
        };
        if m.kind.byte_values() {
            // SAFETY: see above.
            let values = |c: usize, b: usize| unsafe {
                let at = Group::of(b, nb, qs).pair(b % 16 / 2, c);
                _mm512_loadu_si512(tile.add(at).cast())
            };
            dot_body!(a, r, acc, nb, w.cols, scales, values);
        } else {
            // SAFETY: see above.
            let values = |c: usize, b: usize| unsafe {
                let at = Group::of(b, nb, qs).pair(b % 16 / 2, c);
                let raw = _mm256_loadu_si256(tile.add(at).cast());
                let both =
                    _mm512_inserti64x4(_mm512_castsi256_si512(raw), _mm256_srli_epi16(raw, 4), 1);
                _mm512_and_si512(both, low)
            };
            dot_body!(a, r, acc, nb, w.cols, scales, values);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [QuantKind; 5] = [
        QuantKind::Q8_0,
        QuantKind::Q5_0,
        QuantKind::Q5_1,
        QuantKind::Q4_0,
        QuantKind::Q4_1,
    ];

    /// A GGUF row of `kind` with deterministic pseudo-random blocks, and its f32 values.
    fn gguf_row(kind: QuantKind, blocks: usize, seed: u32) -> (Vec<u8>, Vec<f32>) {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state
        };
        let (mut bytes, mut vals) = (Vec::new(), Vec::new());
        for _ in 0..blocks {
            let d = f16::from_f32((next() % 1000) as f32 / 40_000.0 + 1e-4);
            bytes.extend_from_slice(&d.to_le_bytes());
            match kind {
                QuantKind::Q8_0 => {
                    for _ in 0..32 {
                        let q = (next() % 256) as u8 as i8;
                        bytes.push(q as u8);
                        vals.push(d.to_f32() * q as f32);
                    }
                }
                QuantKind::Q5_0 | QuantKind::Q5_1 => {
                    let m = f16::from_f32(-((next() % 1000) as f32) / 20_000.0);
                    if kind == QuantKind::Q5_1 {
                        bytes.extend_from_slice(&m.to_le_bytes());
                    }
                    let v: Vec<u32> = (0..32).map(|_| next() % 32).collect();
                    let qh = v
                        .iter()
                        .enumerate()
                        .fold(0u32, |h, (k, &x)| h | (x >> 4) << k);
                    bytes.extend_from_slice(&qh.to_le_bytes());
                    for i in 0..16 {
                        bytes.push((v[i] & 15 | (v[i + 16] & 15) << 4) as u8);
                    }
                    for &x in &v {
                        vals.push(match kind {
                            QuantKind::Q5_0 => d.to_f32() * (x as f32 - 16.0),
                            _ => d.to_f32() * x as f32 + m.to_f32(),
                        });
                    }
                }
                QuantKind::Q4_0 | QuantKind::Q4_1 => {
                    let m = f16::from_f32(-((next() % 1000) as f32) / 20_000.0);
                    if kind == QuantKind::Q4_1 {
                        bytes.extend_from_slice(&m.to_le_bytes());
                    }
                    let nib: Vec<u8> = (0..32).map(|_| (next() % 16) as u8).collect();
                    for i in 0..16 {
                        bytes.push(nib[i] | (nib[i + 16] << 4));
                    }
                    for &v in &nib {
                        vals.push(match kind {
                            QuantKind::Q4_0 => d.to_f32() * (v as f32 - 8.0),
                            _ => d.to_f32() * v as f32 + m.to_f32(),
                        });
                    }
                }
            }
        }
        (bytes, vals)
    }

    fn matrix(kind: QuantKind, out: usize, inp: usize) -> (QuantMatrix, Vec<f32>) {
        let rows: Vec<(Vec<u8>, Vec<f32>)> = (0..out)
            .map(|j| gguf_row(kind, inp / QK, j as u32 + 7))
            .collect();
        let refs: Vec<&[u8]> = rows.iter().map(|r| r.0.as_slice()).collect();
        let w = QuantMatrix::pack(kind, &refs, inp).unwrap();
        (w, rows.into_iter().flat_map(|r| r.1).collect())
    }

    #[test]
    fn rows_dequantize_to_the_gguf_values() {
        for kind in ALL {
            let (w, vals) = matrix(kind, 5, 96);
            let mut row = vec![0f32; 96];
            for j in 0..5 {
                w.row_into(j, &mut row);
                for (a, b) in row.iter().zip(&vals[j * 96..]) {
                    assert!(
                        (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                        "{kind:?}: {a} vs {b}"
                    );
                }
            }
        }
    }

    /// Every ISA, every type, odd block counts, rows not a multiple of the tile: the product
    /// is the f32 product within the activations' int8 rounding, and a row's result is the
    /// same alone as in a batch.
    #[test]
    fn matmul_matches_f32_and_is_batch_invariant_on_every_isa() {
        for kind in ALL {
            for (out, inp) in [(7, 96), (9, 576), (4, 32)] {
                let (w, vals) = matrix(kind, out, inp);
                let m = 5;
                let x: Vec<f32> = (0..m * inp)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 30.0)
                    .collect();
                for isa in Isa::supported() {
                    let mut y = vec![0f32; m * out];
                    w.matmul(isa, &x, m, None, &mut y, false);
                    for r in 0..m {
                        for j in 0..out {
                            let exact: f32 =
                                (0..inp).map(|t| x[r * inp + t] * vals[j * inp + t]).sum();
                            let norm: f32 = (0..inp)
                                .map(|t| (x[r * inp + t] * vals[j * inp + t]).abs())
                                .sum();
                            let got = y[r * out + j];
                            assert!(
                                (got - exact).abs() <= 0.02 * norm + 1e-5,
                                "{kind:?} {isa:?} {out}x{inp} [{r},{j}]: {got} vs {exact}"
                            );
                        }
                        let mut alone = vec![0f32; out];
                        w.matmul(isa, &x[r * inp..][..inp], 1, None, &mut alone, false);
                        assert_eq!(alone, y[r * out..][..out], "{kind:?} {isa:?} row {r}");
                    }
                    // Bias and accumulate.
                    let bias: Vec<f32> = (0..out).map(|j| j as f32).collect();
                    let mut z = y.clone();
                    w.matmul(isa, &x, m, Some(&bias), &mut z, true);
                    for (i, (a, b)) in z.iter().zip(&y).enumerate() {
                        assert_eq!(*a, b + (b + (i % out) as f32), "{kind:?} {isa:?}");
                    }
                }
            }
        }
    }

    /// llama.cpp's `quantize_row_q8_0`/`_q8_1` on x86: ties round to even at 127/amax, the
    /// scale is rounded to f16, Q8_1's sum is f16(d·Σq); the same on every ISA.
    #[test]
    fn activations_are_quantized_as_llama_cpp_does() {
        let mut x = vec![0f32; 64];
        // Block 0: amax 127, so x·127/amax = x: ties at ±2.5, 3.5.
        x[..5].copy_from_slice(&[2.5, 3.5, -2.5, 127.0, 0.49]);
        // Block 1: amax 12.7, scale 0.1 (not an f16).
        x[32] = 12.7;
        x[33] = 1.0;
        for isa in Isa::supported() {
            for f16_sums in [false, true] {
                let a = QuantActs::new(isa, &x, 1, 64, 2, f16_sums);
                let at = |b, i| a.q[interleaved(b, i)];
                assert_eq!(
                    [at(0, 0), at(0, 1), at(0, 2), at(0, 3), at(0, 4)],
                    [2, 4, -2, 127, 0]
                );
                assert_eq!([at(1, 0), at(1, 1)], [127, 10], "{isa:?}");
                let d1 = f16::from_f32(0.1).to_f32();
                assert_eq!(a.d, [1.0, d1], "{isa:?}");
                let s1 = if f16_sums {
                    f16::from_f32(0.1 * 137.0).to_f32()
                } else {
                    d1 * 137.0
                };
                assert_eq!(a.s, [131.0, s1], "{isa:?} {f16_sums}");
            }
        }
    }

    #[test]
    fn rows_of_the_wrong_length_are_refused() {
        let (row, _) = gguf_row(QuantKind::Q4_1, 2, 1);
        assert!(QuantMatrix::pack(QuantKind::Q4_1, &[&row], 64).is_some());
        assert!(QuantMatrix::pack(QuantKind::Q4_1, &[&row[..39]], 64).is_none());
        assert!(QuantMatrix::pack(QuantKind::Q4_1, &[&row], 48).is_none());
    }
}
