//! `y = x · W` on the CPU for an f32 weight `W` `[k, n]` (a [`super::Linear`]'s transposed,
//! contiguous weight) and a few f32 rows `x` `[m, k]`, reading each weight row once for up to
//! four activation rows.
//!
//! Candle's GEMM is tuned for many rows: for one row it runs single-threaded, and from two rows
//! on it packs the weight at every call. Decoding is one row and verifying drafts a few, and
//! both are bound by reading the weights. Here the output columns are split into panels of 64
//! across threads; a panel walks the weight rows `k` once per tile of up to four activation
//! rows, with the tile's 4 × 64 sums in registers (AVX-512 FMA, AVX2 FMA, or plain Rust, chosen
//! at run time).
//!
//! Every output element is one chain of fused multiply-adds over `k` in order, from zero, on
//! every path and in any tile: a row's result has the same bits whatever the other rows of the
//! call, which keeps verifying drafts in one forward exact.

use rayon::prelude::*;

/// Activation rows up to which [`Linear`](super::Linear) takes [`matmul`]: SmolLM2's F32
/// forwards after 256 tokens measured it faster than the GEMM up to 32 rows, slower at 64
/// (each tile of four rows rereads the panel).
pub const ROWS: usize = 32;
/// Output columns per parallel task.
const PANEL: usize = 64;

/// A pointer to the output, written by tasks in disjoint columns.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: the tasks of one call write disjoint output columns, and the call waits for them.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

type Panel = unsafe fn(&[f32], usize, usize, &[f32], usize, usize, Out);

/// `out[m, n] = x[m, k] · wt[k, n]`, all row-major.
pub fn matmul(x: &[f32], m: usize, k: usize, wt: &[f32], n: usize, out: &mut [f32]) {
    assert!(x.len() >= m * k && wt.len() >= k * n && out.len() >= m * n);
    let panel = best();
    let dst = Out(out.as_mut_ptr());
    (0..n.div_ceil(PANEL)).into_par_iter().for_each(|p| {
        // SAFETY: the slices hold the sizes asserted above, the panel writes columns
        // `p·PANEL..` of `out` only, and `best` chose a kernel this CPU runs.
        unsafe { panel(x, m, k, wt, n, p * PANEL, dst) }
    });
}

fn best() -> Panel {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return x86::panel_avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return x86::panel_avx2;
        }
    }
    panel_scalar
}

/// Columns `j0..j0 + 64` (or up to `n`) of every row, in plain Rust.
///
/// # Safety
/// `out` points at `m × n` floats that no other thread writes in these columns.
unsafe fn panel_scalar(x: &[f32], m: usize, k: usize, wt: &[f32], n: usize, j0: usize, out: Out) {
    let cols = PANEL.min(n - j0);
    let mut acc = [0f32; PANEL];
    for r in 0..m {
        acc[..cols].fill(0.0);
        let xr = &x[r * k..(r + 1) * k];
        for (kk, &xv) in xr.iter().enumerate() {
            let w = &wt[kk * n + j0..kk * n + j0 + cols];
            for (a, &wv) in acc.iter_mut().zip(w) {
                *a = xv.mul_add(wv, *a);
            }
        }
        // SAFETY: row `r`, columns `j0..j0 + cols` are inside `out` and this task's own.
        unsafe { std::ptr::copy_nonoverlapping(acc.as_ptr(), out.0.add(r * n + j0), cols) };
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Out, PANEL};
    use std::arch::x86_64::*;

    /// # Safety
    /// As [`super::panel_scalar`], on a CPU with AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn panel_avx512(
        x: &[f32],
        m: usize,
        k: usize,
        wt: &[f32],
        n: usize,
        j0: usize,
        out: Out,
    ) {
        let cols = PANEL.min(n - j0);
        let masks: [__mmask16; 4] =
            std::array::from_fn(|v| ((1u32 << cols.saturating_sub(16 * v).min(16)) - 1) as u16);
        let mut r0 = 0;
        while m - r0 >= 4 {
            tile512::<4>(x, k, wt, n, j0, &masks, r0, out);
            r0 += 4;
        }
        if m - r0 >= 2 {
            tile512::<2>(x, k, wt, n, j0, &masks, r0, out);
            r0 += 2;
        }
        if m > r0 {
            tile512::<1>(x, k, wt, n, j0, &masks, r0, out);
        }
    }

    /// Rows `r0..r0 + R` against the panel, the sums in `R × 4` registers.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile512<const R: usize>(
        x: &[f32],
        k: usize,
        wt: &[f32],
        n: usize,
        j0: usize,
        masks: &[__mmask16; 4],
        r0: usize,
        out: Out,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        let xp = x.as_ptr().add(r0 * k);
        for kk in 0..k {
            // Masked-off lanes are not read, so the vectors past `n` may point anywhere.
            let row = wt.as_ptr().wrapping_add(kk * n + j0);
            let w: [__m512; 4] =
                std::array::from_fn(|v| _mm512_maskz_loadu_ps(masks[v], row.wrapping_add(16 * v)));
            for (r, acc) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*xp.add(r * k + kk));
                for v in 0..4 {
                    acc[v] = _mm512_fmadd_ps(xv, w[v], acc[v]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let dst = out.0.wrapping_add((r0 + r) * n + j0);
            for v in 0..4 {
                _mm512_mask_storeu_ps(dst.wrapping_add(16 * v), masks[v], acc[v]);
            }
        }
    }

    /// # Safety
    /// As [`super::panel_scalar`], on a CPU with AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn panel_avx2(
        x: &[f32],
        m: usize,
        k: usize,
        wt: &[f32],
        n: usize,
        j0: usize,
        out: Out,
    ) {
        // Two halves of 32 columns, each in 4 registers per row.
        for half in [j0, j0 + 32] {
            if half >= n {
                break;
            }
            let cols = 32.min(n - half);
            let masks: [__m256i; 4] = std::array::from_fn(|v| {
                let live = cols.saturating_sub(8 * v).min(8) as i32;
                _mm256_setr_epi32(
                    -i32::from(live > 0),
                    -i32::from(live > 1),
                    -i32::from(live > 2),
                    -i32::from(live > 3),
                    -i32::from(live > 4),
                    -i32::from(live > 5),
                    -i32::from(live > 6),
                    -i32::from(live > 7),
                )
            });
            let mut r0 = 0;
            while m - r0 >= 2 {
                tile256::<2>(x, k, wt, n, half, &masks, r0, out);
                r0 += 2;
            }
            if m > r0 {
                tile256::<1>(x, k, wt, n, half, &masks, r0, out);
            }
        }
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile256<const R: usize>(
        x: &[f32],
        k: usize,
        wt: &[f32],
        n: usize,
        j0: usize,
        masks: &[__m256i; 4],
        r0: usize,
        out: Out,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        let xp = x.as_ptr().add(r0 * k);
        for kk in 0..k {
            let row = wt.as_ptr().wrapping_add(kk * n + j0);
            let w: [__m256; 4] =
                std::array::from_fn(|v| _mm256_maskload_ps(row.wrapping_add(8 * v), masks[v]));
            for (r, acc) in acc.iter_mut().enumerate() {
                let xv = _mm256_set1_ps(*xp.add(r * k + kk));
                for v in 0..4 {
                    acc[v] = _mm256_fmadd_ps(xv, w[v], acc[v]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let dst = out.0.wrapping_add((r0 + r) * n + j0);
            for v in 0..4 {
                _mm256_maskstore_ps(dst.wrapping_add(8 * v), masks[v], acc[v]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every path against plain arithmetic (within rounding), odd shapes, and each row's bits
    /// the same alone and in a call of many rows.
    #[test]
    fn rows_match_plain_arithmetic_and_have_the_same_bits_in_any_call() {
        let mut seed = 7u64;
        let mut rand = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        for (m, k, n) in [(1, 5, 3), (7, 33, 70), (13, 64, 129), (64, 96, 64)] {
            let x: Vec<f32> = (0..m * k).map(|_| rand()).collect();
            let wt: Vec<f32> = (0..k * n).map(|_| rand()).collect();
            let mut want = vec![0f64; m * n];
            for r in 0..m {
                for kk in 0..k {
                    for j in 0..n {
                        want[r * n + j] += f64::from(x[r * k + kk]) * f64::from(wt[kk * n + j]);
                    }
                }
            }
            let mut got = vec![0f32; m * n];
            matmul(&x, m, k, &wt, n, &mut got);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (f64::from(*g) - w).abs() < 1e-4,
                    "{m}×{k}×{n}: {g} against {w}"
                );
            }
            let mut scalar = vec![0f32; m * n];
            for p in 0..n.div_ceil(PANEL) {
                // SAFETY: one thread, every panel of `scalar` in turn.
                unsafe { panel_scalar(&x, m, k, &wt, n, p * PANEL, Out(scalar.as_mut_ptr())) };
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&got),
                bits(&scalar),
                "{m}×{k}×{n}: vectors and plain Rust"
            );
            for r in 0..m {
                let mut alone = vec![0f32; n];
                matmul(&x[r * k..(r + 1) * k], 1, k, &wt, n, &mut alone);
                assert_eq!(
                    bits(&alone),
                    bits(&got[r * n..(r + 1) * n]),
                    "row {r} alone"
                );
            }
        }
    }
}
