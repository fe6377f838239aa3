//! f32 CPU kernels on plain slices: `x @ wᵀ` for `w` stored `[n, k]` (attention scores against
//! the key cache; weights use [`super::packed`]), RMS norm, RoPE, SwiGLU and a vectorizable `exp`.
//!
//! The matmul computes every output as one dot product over `k` in a single 8-lane accumulator,
//! reduced by the same tree whatever the tile shape, so a row's result does not depend on how
//! many other rows share the call: batch invariance is exact, not approximate.
//!
//! With [`Isa::Avx2`] or better (chosen by `CandleOptions::isa`, checked against the CPU at
//! load) the inner loops use `std::arch` intrinsics; otherwise a portable version with the same
//! structure runs.

use std::ops::Range;

/// A raw pointer that may cross threads: each worker writes a disjoint part of the buffer.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(pub *mut f32);
// SAFETY: users write disjoint index ranges from different threads and join before reading.
unsafe impl Send for SyncPtr {}
// SAFETY: see above.
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper).
    #[inline]
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Which vector instructions the kernels use, resolved against the CPU at load.
///
/// Every kernel computes each output in the same order whatever the ISA (see the module docs),
/// so the ISAs differ in speed only, up to the rounding of a fused multiply-add.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Plain Rust loops.
    Portable,
    /// AVX2, FMA and F16C.
    Avx2,
    /// AVX-512F (with AVX2 and FMA for the kernels that have no AVX-512 version).
    Avx512,
}

impl Isa {
    /// The best ISA this CPU supports.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            if avx2 && is_x86_feature_detected!("avx512f") {
                return Self::Avx512;
            }
            if avx2 {
                return Self::Avx2;
            }
        }
        Self::Portable
    }

    /// Every ISA this CPU can run, best last.
    pub fn supported() -> Vec<Self> {
        [Self::Portable, Self::Avx2, Self::Avx512]
            .into_iter()
            .filter(|&i| i <= Self::detect())
            .collect()
    }

    /// Whether the AVX2+FMA kernels may run.
    #[inline]
    pub(crate) fn avx2(self) -> bool {
        self >= Self::Avx2
    }

    /// Whether the AVX-512 kernels may run.
    #[inline]
    pub(crate) fn avx512(self) -> bool {
        self >= Self::Avx512
    }
}

/// Runs `f` over `0..n` split into ranges of `grain` items on the persistent pool
/// ([`super::pool`]); the calling thread takes part.
#[cfg(not(feature = "rayon"))]
pub(crate) fn par_ranges(n: usize, grain: usize, f: impl Fn(Range<usize>) + Sync) {
    super::pool::pool().run(n, grain, f);
}

/// Runs `f` over `0..n` split into ranges of `grain` items on rayon's global pool.
#[cfg(feature = "rayon")]
pub(crate) fn par_ranges(n: usize, grain: usize, f: impl Fn(Range<usize>) + Sync) {
    use rayon::prelude::*;
    let grain = grain.max(1);
    (0..n.div_ceil(grain))
        .into_par_iter()
        .for_each(|c| f(c * grain..n.min((c + 1) * grain)));
}

/// Number of threads [`par_ranges`] uses.
#[cfg(not(feature = "rayon"))]
pub(crate) fn threads() -> usize {
    super::pool::pool().threads()
}

/// Number of threads [`par_ranges`] uses.
#[cfg(feature = "rayon")]
pub(crate) fn threads() -> usize {
    rayon::current_num_threads()
}

/// Rows of `x` per tile: at most this many activation rows share a pass over 4 weight rows.
const MR: usize = 3;
/// Activation rows kept in L2 while a weight block is swept over them.
const M_BLOCK: usize = 48;

/// `out[m, n] = x[m, k] @ w[n, k]ᵀ` on the calling thread only (inside a parallel unit).
pub(crate) fn matmul_serial(
    isa: Isa,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    out: &mut [f32],
) {
    assert!(x.len() >= m * k && w.len() >= n * k && out.len() >= m * n);
    // SAFETY: `out` holds `m * n` floats and is exclusively borrowed.
    unsafe { matmul_cols(isa, x, m, k, w, n, None, out.as_mut_ptr(), false, 0..n) }
}

/// `out[d] = Σⱼ p[j] · v[j, d]` for `v` of `p.len()` rows of `out.len()` values.
pub(crate) fn weighted_sum(isa: Isa, p: &[f32], v: &[f32], out: &mut [f32]) {
    let hd = out.len();
    assert!(v.len() >= p.len() * hd);
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() && hd.is_multiple_of(8) {
        let mut d0 = 0;
        while d0 < hd {
            let nv = ((hd - d0) / 8).min(8);
            // SAFETY: AVX2 and FMA were detected; the block lies inside every row and `out`.
            unsafe {
                match nv {
                    8 => avx::weighted_sum::<8>(p, v, hd, d0, out),
                    4..=7 => avx::weighted_sum::<4>(p, v, hd, d0, out),
                    2 | 3 => avx::weighted_sum::<2>(p, v, hd, d0, out),
                    _ => avx::weighted_sum::<1>(p, v, hd, d0, out),
                }
            }
            d0 += match nv {
                8 => 64,
                4..=7 => 32,
                2 | 3 => 16,
                _ => 8,
            };
        }
        return;
    }
    out.fill(0.0);
    for (j, &pj) in p.iter().enumerate() {
        for (o, &x) in out.iter_mut().zip(&v[j * hd..(j + 1) * hd]) {
            *o = pj.mul_add(x, *o);
        }
    }
}

/// The columns `cols` of the product, written through `dst` (row stride `n`).
///
/// # Safety
/// `dst` must point to an `m * n` buffer that no one else touches in columns `cols`.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul_cols(
    isa: Isa,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    dst: *mut f32,
    accumulate: bool,
    cols: Range<usize>,
) {
    let mut out4 = [[0f32; 4]; MR];
    for m0 in (0..m).step_by(M_BLOCK) {
        let m1 = (m0 + M_BLOCK).min(m);
        let mut j = cols.start;
        while j < cols.end {
            let nc = (cols.end - j).min(4);
            // Weight rows j..j+4 (a short group repeats its last row; extra lanes are dropped).
            let wr: [&[f32]; 4] = std::array::from_fn(|c| {
                let row = j + c.min(nc - 1);
                &w[row * k..(row + 1) * k]
            });
            let mut r = m0;
            while r < m1 {
                let nr = (m1 - r).min(MR);
                let xr: [&[f32]; MR] = std::array::from_fn(|i| {
                    let row = r + i.min(nr - 1);
                    &x[row * k..(row + 1) * k]
                });
                tile(isa, &xr, nr, &wr, k, &mut out4);
                for (i, o) in out4.iter().enumerate().take(nr) {
                    for (c, &v) in o.iter().enumerate().take(nc) {
                        let v = v + bias.map_or(0.0, |b| b[j + c]);
                        // SAFETY: (r + i, j + c) is inside the caller's columns and `m * n`.
                        unsafe {
                            let p = dst.add((r + i) * n + j + c);
                            if accumulate {
                                *p += v;
                            } else {
                                *p = v;
                            }
                        }
                    }
                }
                r += nr;
            }
            j += nc;
        }
    }
}

/// Dot products of `nr` (≤ [`MR`]) activation rows with 4 weight rows.
#[inline]
fn tile(
    isa: Isa,
    x: &[&[f32]; MR],
    nr: usize,
    w: &[&[f32]; 4],
    k: usize,
    out: &mut [[f32; 4]; MR],
) {
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        // SAFETY: AVX2 and FMA were detected; all rows are `k` long.
        unsafe {
            match nr {
                1 => avx::tile::<1>(x, w, k, out),
                2 => avx::tile::<2>(x, w, k, out),
                _ => avx::tile::<3>(x, w, k, out),
            }
        }
        return;
    }
    portable_tile(x, nr, w, k, out);
}

/// The same sums as the AVX2 tile: 8 lanes, then pairs, quads, halves.
fn portable_tile(x: &[&[f32]; MR], nr: usize, w: &[&[f32]; 4], k: usize, out: &mut [[f32; 4]; MR]) {
    let k8 = k / 8 * 8;
    for i in 0..nr {
        for c in 0..4 {
            let mut acc = [0f32; 8];
            for (xc, wc) in x[i][..k8].chunks_exact(8).zip(w[c][..k8].chunks_exact(8)) {
                for l in 0..8 {
                    acc[l] = xc[l].mul_add(wc[l], acc[l]);
                }
            }
            let mut s = reduce8(&acc);
            for t in k8..k {
                s += x[i][t] * w[c][t];
            }
            out[i][c] = s;
        }
    }
}

/// Sum of 8 lanes in the AVX2 kernels' order.
#[inline]
fn reduce8(a: &[f32; 8]) -> f32 {
    // hadd pairs (0+1, 2+3) per 128-bit half, then across pairs, then the two halves.
    let lo = (a[0] + a[1]) + (a[2] + a[3]);
    let hi = (a[4] + a[5]) + (a[6] + a[7]);
    lo + hi
}

/// Dot product of two equally long slices (8 lanes, same reduction as the matmul).
#[inline]
pub(crate) fn dot(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        // SAFETY: AVX2 and FMA were detected.
        return unsafe { avx::dot(a, b) };
    }
    let k8 = a.len() / 8 * 8;
    let mut acc = [0f32; 8];
    for (ac, bc) in a[..k8].chunks_exact(8).zip(b[..k8].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] = ac[l].mul_add(bc[l], acc[l]);
        }
    }
    let mut s = reduce8(&acc);
    for t in k8..a.len() {
        s += a[t] * b[t];
    }
    s
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    use super::MR;

    /// Reduces four 8-lane accumulators to their four sums (the order of [`super::reduce8`]).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn reduce4(a: __m256, b: __m256, c: __m256, d: __m256) -> __m128 {
        // hadd(a, b) = [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7]
        let ab = _mm256_hadd_ps(a, b);
        let cd = _mm256_hadd_ps(c, d);
        // [(a0+a1)+(a2+a3), (b0+b1)+(b2+b3), c.., d.. | same for the high halves]
        let abcd = _mm256_hadd_ps(ab, cd);
        _mm_add_ps(
            _mm256_castps256_ps128(abcd),
            _mm256_extractf128_ps::<1>(abcd),
        )
    }

    /// `R` activation rows times 4 weight rows, each over all of `k`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile<const R: usize>(
        x: &[&[f32]; MR],
        w: &[&[f32]; 4],
        k: usize,
        out: &mut [[f32; 4]; MR],
    ) {
        let k8 = k / 8 * 8;
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        let xp: [*const f32; R] = std::array::from_fn(|i| x[i].as_ptr());
        let wp: [*const f32; 4] = std::array::from_fn(|c| w[c].as_ptr());
        let mut t = 0;
        while t < k8 {
            // SAFETY: t + 8 <= k8 <= every row's length.
            unsafe {
                let xv: [__m256; R] = std::array::from_fn(|i| _mm256_loadu_ps(xp[i].add(t)));
                for c in 0..4 {
                    let wv = _mm256_loadu_ps(wp[c].add(t));
                    for i in 0..R {
                        acc[i][c] = _mm256_fmadd_ps(xv[i], wv, acc[i][c]);
                    }
                }
            }
            t += 8;
        }
        for i in 0..R {
            let s = reduce4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
            // SAFETY: out[i] is 4 floats.
            unsafe { _mm_storeu_ps(out[i].as_mut_ptr(), s) };
            for c in 0..4 {
                for t in k8..k {
                    out[i][c] += x[i][t] * w[c][t];
                }
            }
        }
    }

    /// Columns `d0..d0 + 8 * NV` of `Σⱼ p[j] · v[j, ..]`, accumulated in registers.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn weighted_sum<const NV: usize>(
        p: &[f32],
        v: &[f32],
        hd: usize,
        d0: usize,
        out: &mut [f32],
    ) {
        let mut acc = [_mm256_setzero_ps(); NV];
        for (j, &pj) in p.iter().enumerate() {
            let pv = _mm256_set1_ps(pj);
            // SAFETY: the caller checked v holds p.len() rows of hd >= d0 + 8 * NV values.
            unsafe {
                let row = v.as_ptr().add(j * hd + d0);
                for (i, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(pv, _mm256_loadu_ps(row.add(8 * i)), *a);
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            // SAFETY: d0 + 8 * NV <= out.len().
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(d0 + 8 * i), *a) };
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let k = a.len().min(b.len());
        let k8 = k / 8 * 8;
        let mut acc = _mm256_setzero_ps();
        let mut t = 0;
        while t < k8 {
            // SAFETY: t + 8 <= k.
            unsafe {
                acc = _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.as_ptr().add(t)),
                    _mm256_loadu_ps(b.as_ptr().add(t)),
                    acc,
                );
            }
            t += 8;
        }
        let z = _mm256_setzero_ps();
        let mut s = _mm_cvtss_f32(reduce4(acc, z, z, z));
        for t in k8..k {
            s += a[t] * b[t];
        }
        s
    }

    /// `exp` over a slice, in place (see [`super::exp_approx`]).
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp_inplace(xs: &mut [f32]) {
        for x in xs.iter_mut() {
            *x = super::exp_approx(*x);
        }
    }

    /// `silu(gate) * up` (see [`super::exp_approx`]).
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = super::silu_mul(g, u);
        }
    }
}

/// `eˣ` to about 2 ulp for finite inputs (0 below -87.3, +∞ above 88.7), in operations that
/// vectorize: `2ⁿ · p(r)` with `r = x - n·ln 2`, `|r| ≤ ln 2 / 2`, `p` a degree-6 polynomial.
#[inline(always)]
pub(crate) fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-87.336_55, 88.722_83);
    let n = (xc * LOG2E + 0.5).floor();
    let r = xc - n * LN2_HI - n * LN2_LO;
    // Cephes expf coefficients.
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 5e-1);
    let p = (p * r).mul_add(r, r) + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    let y = p * scale;
    if x < -87.336_55 {
        0.0
    } else if x > 88.722_83 {
        f32::INFINITY
    } else {
        y
    }
}

#[inline(always)]
fn silu_mul(g: f32, u: f32) -> f32 {
    g / (1.0 + exp_approx(-g)) * u
}

/// `exp` of every element, in place.
pub(crate) fn exp_inplace(isa: Isa, xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        // SAFETY: AVX2 and FMA were detected.
        return unsafe { avx::exp_inplace(xs) };
    }
    for x in xs.iter_mut() {
        *x = exp_approx(*x);
    }
}

/// `out = silu(gate) * up`, elementwise.
pub(crate) fn swiglu(isa: Isa, gate: &[f32], up: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        // SAFETY: AVX2 and FMA were detected.
        return unsafe { avx::swiglu(gate, up, out) };
    }
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu_mul(g, u);
    }
}

/// RMS norm of each `dim`-long row of `x` into `out`, scaled by `weight`.
pub(crate) fn rms_norm(isa: Isa, x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let dim = weight.len();
    for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let ss = dot(isa, xr, xr);
        let inv = 1.0 / (ss / dim as f32 + eps).sqrt();
        for ((o, &v), &w) in or.iter_mut().zip(xr).zip(weight) {
            *o = v * inv * w;
        }
    }
}

/// Rotates one head (`2 * cos.len()` values) in place: halves `(a, b)` become
/// `(a·cos − b·sin, a·sin + b·cos)` (the non-interleaved RoPE of Llama checkpoints).
#[inline]
pub(crate) fn rope(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    let (a, b) = head.split_at_mut(half);
    for i in 0..half {
        let (x1, x2) = (a[i], b[i]);
        a[i] = x1 * cos[i] - x2 * sin[i];
        b[i] = x1 * sin[i] + x2 * cos[i];
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Deterministic values in [-1, 1) for kernel tests (also used by `packed`'s).
    pub(in crate::cpu) fn data(len: usize, salt: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let h = (i as u32)
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(salt * 97);
                ((h >> 8) % 2000) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn naive(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0.0; m * n];
        for r in 0..m {
            for j in 0..n {
                out[r * n + j] = (0..k)
                    .map(|t| x[r * k + t] as f64 * w[j * k + t] as f64)
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    #[test]
    fn matmul_matches_naive_for_odd_shapes() {
        for &(m, k, n) in &[
            (1, 64, 4),
            (1, 576, 963),
            (2, 13, 7),
            (5, 40, 9),
            (50, 96, 70),
            (3, 1536, 33),
        ] {
            let x = data(m * k, 1);
            let w = data(n * k, 2);
            let want = naive(&x, m, k, &w, n);
            for isa in Isa::supported() {
                let mut out = vec![1.0; m * n];
                matmul_serial(isa, &x, m, k, &w, n, &mut out);
                for (i, (&o, &e)) in out.iter().zip(&want).enumerate() {
                    assert!(
                        (o - e).abs() < 1e-4 * (1.0 + e.abs()),
                        "{isa:?} m{m} k{k} n{n} [{i}]: {o} vs {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_row_is_the_same_in_any_batch() {
        let (k, n) = (576, 300);
        let x = data(17 * k, 5);
        let w = data(n * k, 6);
        for isa in Isa::supported() {
            let mut all = vec![0.0; 17 * n];
            matmul_serial(isa, &x, 17, k, &w, n, &mut all);
            for r in [0, 4, 16] {
                let mut one = vec![0.0; n];
                matmul_serial(isa, &x[r * k..(r + 1) * k], 1, k, &w, n, &mut one);
                assert_eq!(one, all[r * n..(r + 1) * n]);
            }
        }
    }

    #[test]
    fn exp_and_silu_are_accurate() {
        for i in -1700..1700 {
            let x = i as f32 * 0.05;
            let (got, want) = (exp_approx(x), x.exp());
            assert!(
                (got - want).abs() <= 4e-7 * want,
                "exp({x}) = {got}, want {want}"
            );
        }
        assert_eq!(exp_approx(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_approx(-100.0), 0.0);
        for isa in Isa::supported() {
            let mut v = vec![-1.0, 0.0, 2.5, -30.0, 7.0, 1.0, 3.0, -5.0, 0.5];
            let want: Vec<f32> = v.iter().map(|x: &f32| x.exp()).collect();
            exp_inplace(isa, &mut v);
            for (g, w) in v.iter().zip(&want) {
                assert!((g - w).abs() <= 4e-7 * w);
            }
            let g = [-3.0f32, 0.0, 1.5, 20.0];
            let u = [2.0f32, 1.0, -1.0, 0.5];
            let mut o = [0.0f32; 4];
            swiglu(isa, &g, &u, &mut o);
            for i in 0..4 {
                let want = g[i] / (1.0 + (-g[i]).exp()) * u[i];
                assert!((o[i] - want).abs() <= 1e-6 * (1.0 + want.abs()));
            }
        }
    }
}

#[cfg(test)]
mod bench {
    use std::time::Instant;

    /// `cargo test --release -p infermux-backend-candle bandwidth -- --ignored --nocapture`:
    /// the m = 1 matmul's read rate next to a plain streaming sum over the same bytes.
    #[test]
    #[ignore]
    fn bandwidth() {
        let (k, n) = (576, 49152 * 2);
        let w: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32).collect();
        let packed = super::super::packed::PackedMatrix::pack(&w, n, k);
        let x = vec![0.5f32; 16 * k];
        let gb = (n * k * 4) as f64 / 1e9;
        for _ in 0..3 {
            let t = Instant::now();
            let s: f32 = w
                .chunks_exact(8)
                .fold([0f32; 8], |mut a, c| {
                    for l in 0..8 {
                        a[l] += c[l];
                    }
                    a
                })
                .iter()
                .sum();
            std::hint::black_box(s);
            let sum = t.elapsed().as_secs_f64();
            for m in [1, 4, 16] {
                let mut out = vec![0f32; m * n];
                let t = Instant::now();
                packed.matmul(super::Isa::detect(), &x, m, None, &mut out, false);
                let mm = t.elapsed().as_secs_f64();
                println!(
                    "sum {:.1} GB/s; matmul m={m} {:.1} GB/s ({:.1} GFLOP/s)",
                    gb / sum,
                    gb / mm,
                    (2 * m * n * k) as f64 / mm / 1e9
                );
            }
        }
    }
}
