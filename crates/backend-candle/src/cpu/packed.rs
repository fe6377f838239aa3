//! Weight matrices packed for `x @ wᵀ`: the projection and output-head matmuls.
//!
//! A checkpoint stores `w` as `[out, in]`. Packed, every group of [`NR`] output columns is one
//! contiguous panel holding, for each input index `t`, the 32 weights `w[j..j + 32, t]`. The
//! kernel then broadcasts one activation and multiplies it into whole vectors of weights (an
//! outer product per `t`), so no horizontal sums are needed, a batch-1 step streams the weights
//! in order, and a larger batch reuses each panel from cache for up to [`MR`] rows at a time.
//!
//! Every output is one fused multiply-add chain over `t` in order, whatever the kernel (AVX-512,
//! AVX2 or portable) and whatever the number of rows in the call: a row's result does not depend
//! on the batch it is in.
//!
//! Panels hold f32, f16 or bf16 weights ([`Elem`]). A 16-bit weight is widened to f32 exactly as
//! it is loaded (`vcvtph2ps`, or a 16-bit shift for bf16) and the product runs in f32, so a 16-bit
//! matrix gives the f32 result of its widened weights, bit for bit, while a batch-1 step reads
//! half the bytes (bf16 panels alternate two vectors' columns: [`Elem::slot`]). (The bf16 dot-product instruction `vdpbf16ps` would also round the
//! activations to bf16; decode is bound by the weight bytes, not the FMAs, so it would buy
//! nothing there and cost precision.)

use half::{bf16, f16};

use super::kernels::{Isa, SyncPtr, par_ranges, threads};

/// How a panel stores one weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ElemKind {
    F32,
    F16,
    Bf16,
}

/// A weight type of the panels: f32, or a 16-bit float widened to f32 as it is loaded.
pub(crate) trait Elem: Copy + Default + Send + Sync + 'static {
    const KIND: ElemKind;
    fn to_f32(self) -> f32;

    /// Where column `c` (< [`NR`]) of a panel row is stored: in order, except for bf16, whose
    /// columns 0..16 and 16..32 alternate so that one 64-byte load widens to both vectors by a
    /// shift and a mask (two `vpmovzxwd` loads held batch-1 decode at ~25 GB/s on AMD EPYC).
    #[inline(always)]
    fn slot(c: usize) -> usize {
        match Self::KIND {
            ElemKind::Bf16 => (c % 16) * 2 + c / 16,
            ElemKind::F32 | ElemKind::F16 => c,
        }
    }
}

impl Elem for f32 {
    const KIND: ElemKind = ElemKind::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl Elem for f16 {
    const KIND: ElemKind = ElemKind::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

impl Elem for bf16 {
    const KIND: ElemKind = ElemKind::Bf16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// Output columns per panel: two AVX-512 vectors, four AVX2 vectors.
pub(crate) const NR: usize = 32;
/// Activation rows per register tile (AVX-512: 2 × 12 accumulators).
const MR: usize = 12;

/// `w` (`[out, in]`) in panels of [`NR`] output columns of `E`, zero-padded past `out`.
pub(crate) struct PackedMatrix<E: Elem = f32> {
    data: Vec<E>,
    out: usize,
    inp: usize,
}

impl<E: Elem> PackedMatrix<E> {
    /// Packs `w`, an `[out, in]` row-major matrix.
    pub(crate) fn pack(w: &[E], out: usize, inp: usize) -> Self {
        assert_eq!(w.len(), out * inp, "weight length");
        assert!(inp > 0, "a matrix of zero-width rows");
        let rows: Vec<&[E]> = w.chunks_exact(inp).collect();
        Self::pack_rows(&rows, inp)
    }

    /// Packs the matrix whose rows are `rows` (each `inp` long): a load packs straight from
    /// the mapped checkpoint, the parts of a fused projection in turn.
    pub(crate) fn pack_rows(rows: &[&[E]], inp: usize) -> Self {
        /// Packed bytes above which the panels are split over one thread per core (threads
        /// of their own, not the kernels' pool, which the engine may be stepping on: a
        /// weight update's read shares the cores with the requests still draining, then
        /// takes all of them).
        const PARALLEL_BYTES: usize = 4 << 20;
        let out = rows.len();
        assert!(rows.iter().all(|r| r.len() == inp), "row length");
        let panels = out.div_ceil(NR);
        let mut data = zeroed(panels * NR * inp);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let per = if data.len() * size_of::<E>() >= PARALLEL_BYTES && threads > 1 {
            panels.div_ceil(threads)
        } else {
            panels.max(1)
        };
        std::thread::scope(|scope| {
            let mut chunks = data.chunks_mut(per * NR * inp).enumerate();
            let first = chunks.next();
            for (i, chunk) in chunks {
                scope.spawn(move || pack_panels(rows, inp, i * per, chunk));
            }
            if let Some((_, chunk)) = first {
                pack_panels(rows, inp, 0, chunk);
            }
        });
        Self { data, out, inp }
    }

    /// Output width.
    pub(crate) fn out(&self) -> usize {
        self.out
    }

    /// Input width.
    pub(crate) fn inp(&self) -> usize {
        self.inp
    }

    /// Row `j` of the unpacked matrix (an embedding lookup when this is a tied output head).
    pub(crate) fn row_into(&self, j: usize, dst: &mut [f32]) {
        let panel = &self.data[j / NR * NR * self.inp..][..NR * self.inp];
        for (t, d) in dst[..self.inp].iter_mut().enumerate() {
            *d = panel[t * NR + E::slot(j % NR)].to_f32();
        }
    }

    /// `out[m, self.out] (+)= x[m, self.inp] @ wᵀ (+ bias)`; `accumulate` adds to `out`
    /// (a residual). Panels are shared out among the pool's threads.
    pub(crate) fn matmul(
        &self,
        isa: Isa,
        x: &[f32],
        m: usize,
        bias: Option<&[f32]>,
        out: &mut [f32],
        accumulate: bool,
    ) {
        let (n, k) = (self.out, self.inp);
        assert!(x.len() >= m * k && out.len() >= m * n);
        if let Some(b) = bias {
            assert!(b.len() >= n);
        }
        if m == 0 || n == 0 {
            return;
        }
        let panels = n.div_ceil(NR);
        // About 8 claims per thread; a single claim for tiny calls.
        let grain = if m * n * k < 1 << 17 {
            panels
        } else {
            panels.div_ceil(threads() * 8).max(1)
        };
        let dst = SyncPtr(out.as_mut_ptr());
        par_ranges(panels, grain, |range| {
            let mut tile = [[0f32; NR]; MR];
            // Panel outermost: each panel comes from memory once and stays in L1/L2 while
            // every row passes over it; the rows (a few MiB at most) stay in L2/L3.
            for p in range {
                let panel = &self.data[p * NR * k..][..NR * k];
                let cols = NR.min(n - p * NR);
                let mut r = 0;
                while r < m {
                    let rows = (m - r).min(MR);
                    panel_tile(isa, &x[r * k..(r + rows) * k], rows, k, panel, &mut tile);
                    for (i, acc) in tile.iter().enumerate().take(rows) {
                        // SAFETY: columns p·NR.. of row r + i belong to panel p, which only
                        // this range writes, and lie inside `m * n`.
                        let o = unsafe {
                            std::slice::from_raw_parts_mut(
                                dst.get().add((r + i) * n + p * NR),
                                cols,
                            )
                        };
                        store(
                            o,
                            &acc[..cols],
                            bias.map(|b| &b[p * NR..][..cols]),
                            accumulate,
                        );
                    }
                    r += rows;
                }
            }
        });
    }
}

/// Writes panels `first..` of the matrix of `rows` into `dst` (whole panels).
fn pack_panels<E: Elem>(rows: &[&[E]], inp: usize, first: usize, dst: &mut [E]) {
    /// Rows and input indices per tile: 8 × 8 values read as 8 row pieces and written as 8
    /// panel pieces, a transpose the compiler keeps in registers.
    const T: usize = 8;
    let out = rows.len();
    for (p, panel) in (first..).zip(dst.chunks_exact_mut(NR * inp)) {
        let panel_rows = &rows[p * NR..(p * NR + NR).min(out)];
        for t0 in (0..inp).step_by(T) {
            let tn = (inp - t0).min(T);
            for c0 in (0..panel_rows.len()).step_by(T) {
                let mut tile = [[E::default(); T]; T];
                for (piece, row) in tile.iter_mut().zip(&panel_rows[c0..]) {
                    match row[t0..].first_chunk::<T>() {
                        Some(whole) => *piece = *whole,
                        None => piece[..tn]
                            .iter_mut()
                            .zip(&row[t0..])
                            .for_each(|(d, &v)| *d = v),
                    }
                }
                for t in 0..tn {
                    let dst = &mut panel[(t0 + t) * NR..][..NR];
                    for (c, piece) in tile.iter().enumerate() {
                        dst[E::slot(c0 + c)] = piece[t];
                    }
                }
            }
        }
    }
}

/// `n` zeros in memory the kernel may back with transparent huge pages (where it only does
/// so on request, as by default): packing a 135M model then takes 2 MiB page faults instead
/// of 4 KiB ones, which were a third of a weight load's time, and a decode step's stream of
/// weights misses the TLB 512× less often.
pub(super) fn zeroed<E: Copy + Default>(n: usize) -> Vec<E> {
    let v = vec![E::default(); n];
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = v.as_ptr() as usize;
        let (first, end) = (
            start.next_multiple_of(HUGE),
            (start + n * size_of::<E>()) / HUGE * HUGE,
        );
        if end > first {
            // SAFETY: advice about whole pages inside `v`'s allocation; it changes how the
            // kernel backs them, never their contents. A refusal is harmless and ignored.
            unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE) };
        }
    }
    v
}

/// `out (+)= acc (+ bias)`, vectorizable.
#[inline]
fn store(out: &mut [f32], acc: &[f32], bias: Option<&[f32]>, accumulate: bool) {
    match (bias, accumulate) {
        (None, false) => out.copy_from_slice(acc),
        (None, true) => out.iter_mut().zip(acc).for_each(|(o, a)| *o += a),
        (Some(b), false) => {
            for ((o, a), b) in out.iter_mut().zip(acc).zip(b) {
                *o = a + b;
            }
        }
        (Some(b), true) => {
            for ((o, a), b) in out.iter_mut().zip(acc).zip(b) {
                *o += a + b;
            }
        }
    }
}

/// `tile[i][c] = Σₜ x[i, t] · panel[t, c]` for the `rows` (≤ [`MR`]) rows of `x`.
fn panel_tile<E: Elem>(
    isa: Isa,
    x: &[f32],
    rows: usize,
    k: usize,
    panel: &[E],
    tile: &mut [[f32; NR]; MR],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if isa.avx512() {
            // SAFETY: AVX-512F was detected; `x` holds `rows` rows of `k`, `panel` `k` × NR.
            unsafe { avx512::tile(x, rows, k, panel, tile) };
            return;
        }
        if isa.avx2() {
            // SAFETY: AVX2, FMA and F16C were detected; shapes as above.
            unsafe { avx2::tile(x, rows, k, panel, tile) };
            return;
        }
    }
    for (i, acc) in tile.iter_mut().enumerate().take(rows) {
        *acc = [0.0; NR];
        for (t, w) in panel.chunks_exact(NR).enumerate() {
            let xv = x[i * k + t];
            for (c, a) in acc.iter_mut().enumerate() {
                *a = xv.mul_add(w[E::slot(c)].to_f32(), *a);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Elem, ElemKind, MR, NR};
    use std::arch::x86_64::*;

    /// The 32 weights of a panel row at `p` widened to f32, columns 0..16 and 16..32
    /// (exactly: f16 by `vcvtph2ps`, bf16 by a shift or a mask of its alternating slots).
    ///
    /// # Safety
    /// AVX-512F; `p` points to 32 readable weights.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load32<E: Elem>(p: *const E) -> [__m512; 2] {
        // SAFETY: forwarded from the caller.
        unsafe {
            match E::KIND {
                ElemKind::F32 => [_mm512_loadu_ps(p.cast()), _mm512_loadu_ps(p.add(16).cast())],
                ElemKind::F16 => [
                    _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())),
                    _mm512_cvtph_ps(_mm256_loadu_si256(p.add(16).cast())),
                ],
                ElemKind::Bf16 => {
                    let v = _mm512_loadu_si512(p.cast());
                    [
                        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v)),
                        _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(-65_536))),
                    ]
                }
            }
        }
    }

    /// Dispatches `rows` to a register tile of that many rows.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile<E: Elem>(
        x: &[f32],
        rows: usize,
        k: usize,
        panel: &[E],
        out: &mut [[f32; NR]; MR],
    ) {
        debug_assert!(x.len() >= rows * k && panel.len() >= k * NR);
        // SAFETY: forwarded from the caller.
        unsafe {
            match rows {
                1 => tile_r::<E, 1>(x, k, panel, out),
                2 => tile_r::<E, 2>(x, k, panel, out),
                3 => tile_r::<E, 3>(x, k, panel, out),
                4 => tile_r::<E, 4>(x, k, panel, out),
                5 => tile_r::<E, 5>(x, k, panel, out),
                6 => tile_r::<E, 6>(x, k, panel, out),
                7 => tile_r::<E, 7>(x, k, panel, out),
                8 => tile_r::<E, 8>(x, k, panel, out),
                9 => tile_r::<E, 9>(x, k, panel, out),
                10 => tile_r::<E, 10>(x, k, panel, out),
                11 => tile_r::<E, 11>(x, k, panel, out),
                _ => tile_r::<E, 12>(x, k, panel, out),
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_r<E: Elem, const R: usize>(
        x: &[f32],
        k: usize,
        panel: &[E],
        out: &mut [[f32; NR]; MR],
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let (xp, wp) = (x.as_ptr(), panel.as_ptr());
        for t in 0..k {
            // SAFETY: t < k; the panel holds k × NR weights and x holds R rows of k.
            unsafe {
                let [w0, w1] = load32(wp.add(t * NR));
                for (i, a) in acc.iter_mut().enumerate() {
                    let xv = _mm512_set1_ps(*xp.add(i * k + t));
                    a[0] = _mm512_fmadd_ps(xv, w0, a[0]);
                    a[1] = _mm512_fmadd_ps(xv, w1, a[1]);
                }
            }
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            // SAFETY: each row of `out` holds NR = 32 floats.
            unsafe {
                _mm512_storeu_ps(o.as_mut_ptr(), a[0]);
                _mm512_storeu_ps(o.as_mut_ptr().add(16), a[1]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Elem, ElemKind, MR, NR};
    use std::arch::x86_64::*;

    /// The 32 weights of a panel row at `p` widened to f32, columns 0..8, 8..16, 16..24,
    /// 24..32 (exactly; bf16 by a shift or a mask of its alternating slots).
    ///
    /// # Safety
    /// AVX2 and F16C; `p` points to 32 readable weights.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load32<E: Elem>(p: *const E) -> [__m256; 4] {
        // SAFETY: forwarded from the caller.
        unsafe {
            match E::KIND {
                ElemKind::F32 => std::array::from_fn(|v| _mm256_loadu_ps(p.add(8 * v).cast())),
                ElemKind::F16 => {
                    std::array::from_fn(|v| _mm256_cvtph_ps(_mm_loadu_si128(p.add(8 * v).cast())))
                }
                ElemKind::Bf16 => {
                    let (a, b) = (
                        _mm256_loadu_si256(p.cast()),
                        _mm256_loadu_si256(p.add(16).cast()),
                    );
                    let high = _mm256_set1_epi32(-65_536);
                    [
                        _mm256_slli_epi32::<16>(a),
                        _mm256_slli_epi32::<16>(b),
                        _mm256_and_si256(a, high),
                        _mm256_and_si256(b, high),
                    ]
                    .map(|v| _mm256_castsi256_ps(v))
                }
            }
        }
    }

    /// Tiles of 3 rows (12 accumulators of 8 lanes) until `rows` are done.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile<E: Elem>(
        x: &[f32],
        rows: usize,
        k: usize,
        panel: &[E],
        out: &mut [[f32; NR]; MR],
    ) {
        let mut r = 0;
        while r < rows {
            let x = &x[r * k..];
            let out = &mut out[r..];
            // SAFETY: forwarded from the caller.
            unsafe {
                match rows - r {
                    1 => tile_r::<E, 1>(x, k, panel, out),
                    2 => tile_r::<E, 2>(x, k, panel, out),
                    _ => tile_r::<E, 3>(x, k, panel, out),
                }
            }
            r += 3;
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile_r<E: Elem, const R: usize>(
        x: &[f32],
        k: usize,
        panel: &[E],
        out: &mut [[f32; NR]],
    ) {
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        let (xp, wp) = (x.as_ptr(), panel.as_ptr());
        for t in 0..k {
            // SAFETY: t < k; the panel holds k × NR weights and x holds R rows of k.
            unsafe {
                let w = load32(wp.add(t * NR));
                for (i, a) in acc.iter_mut().enumerate() {
                    let xv = _mm256_set1_ps(*xp.add(i * k + t));
                    for v in 0..4 {
                        a[v] = _mm256_fmadd_ps(xv, w[v], a[v]);
                    }
                }
            }
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            for (v, &av) in a.iter().enumerate() {
                // SAFETY: each row of `out` holds NR = 32 floats.
                unsafe { _mm256_storeu_ps(o.as_mut_ptr().add(8 * v), av) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::kernels::tests::data;

    /// A matrix large enough to be packed on several threads, of a width that is no multiple
    /// of the tile or panel: every row unpacks to itself, the padding stays zero.
    #[test]
    fn a_large_matrix_packs_in_parallel_to_the_same_rows() {
        let (out, inp) = (1_061, 1_037);
        let w = data(out * inp, 3);
        let packed = PackedMatrix::pack(&w, out, inp);
        assert!(packed.data.len() * 4 >= 4 << 20);
        let mut row = vec![0f32; inp];
        for j in 0..out {
            packed.row_into(j, &mut row);
            assert_eq!(row, w[j * inp..][..inp], "row {j}");
        }
        let padding = (out..out.div_ceil(NR) * NR).flat_map(|j| {
            let panel = &packed.data[j / NR * NR * inp..][..NR * inp];
            (0..inp).map(move |t| panel[t * NR + f32::slot(j % NR)])
        });
        assert!(padding.into_iter().all(|v| v == 0.0));
    }

    #[test]
    fn packed_matmul_matches_naive_for_odd_shapes() {
        for &(m, k, n) in &[
            (1, 64, 4),
            (1, 576, 963),
            (2, 13, 7),
            (5, 40, 9),
            (13, 40, 33),
            (50, 96, 70),
            (3, 1536, 33),
        ] {
            let x = data(m * k, 1);
            let w = data(n * k, 2);
            let bias = data(n, 3);
            let packed = PackedMatrix::pack(&w, n, k);
            for isa in Isa::supported() {
                let mut out = vec![1.0; m * n];
                packed.matmul(isa, &x, m, Some(&bias), &mut out, true);
                for r in 0..m {
                    for j in 0..n {
                        let dot: f64 = (0..k)
                            .map(|t| x[r * k + t] as f64 * w[j * k + t] as f64)
                            .sum();
                        let want = (dot + bias[j] as f64 + 1.0) as f32;
                        let got = out[r * n + j];
                        assert!(
                            (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "{isa:?} m{m} k{k} n{n} [{r},{j}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_is_the_same_in_any_batch() {
        let (k, n) = (576, 300);
        let x = data(61 * k, 5);
        let packed = PackedMatrix::pack(&data(n * k, 6), n, k);
        for isa in Isa::supported() {
            let mut all = vec![0.0; 61 * n];
            packed.matmul(isa, &x, 61, None, &mut all, false);
            for r in [0, 4, 11, 12, 47, 48, 60] {
                let mut one = vec![0.0; n];
                packed.matmul(isa, &x[r * k..(r + 1) * k], 1, None, &mut one, false);
                assert_eq!(one, all[r * n..(r + 1) * n], "{isa:?} row {r}");
            }
        }
    }

    #[test]
    fn rows_unpack() {
        let (n, k) = (70, 9);
        let w = data(n * k, 7);
        let packed = PackedMatrix::pack(&w, n, k);
        let mut row = vec![0.0; k];
        for j in [0, 31, 32, 69] {
            packed.row_into(j, &mut row);
            assert_eq!(row, w[j * k..(j + 1) * k]);
        }
    }

    /// A 16-bit matrix gives, on every ISA, exactly the f32 result of its widened weights:
    /// the kernels widen each weight as it is loaded and run the same FMA chain.
    #[test]
    fn half_matrices_equal_the_f32_product_of_their_widened_weights() {
        fn check<E: Elem>(narrow: fn(f32) -> E) {
            for &(m, k, n) in &[(1, 576, 963), (5, 40, 9), (13, 96, 70)] {
                let x = data(m * k, 1);
                let w: Vec<E> = data(n * k, 2).into_iter().map(narrow).collect();
                let wide: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
                let (half, full) = (
                    PackedMatrix::pack(&w, n, k),
                    PackedMatrix::pack(&wide, n, k),
                );
                let bias = data(n, 3);
                for isa in Isa::supported() {
                    let (mut a, mut b) = (vec![1.0; m * n], vec![1.0; m * n]);
                    half.matmul(isa, &x, m, Some(&bias), &mut a, true);
                    full.matmul(isa, &x, m, Some(&bias), &mut b, true);
                    assert_eq!(a, b, "{:?} {isa:?} m{m} k{k} n{n}", E::KIND);
                }
                let mut row = vec![0f32; k];
                half.row_into(n - 1, &mut row);
                assert_eq!(row, wide[(n - 1) * k..]);
            }
        }
        check(half::f16::from_f32);
        check(half::bf16::from_f32);
    }
}
