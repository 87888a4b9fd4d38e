//! `y = x · Wᵀ` on the CPU for an f32 weight `W` `[n, k]` kept in its checkpoint layout
//! (`[out, in]`, contiguous) and a few f32 rows `x` `[m, k]`: every output is a dot product
//! over one contiguous weight row, as llama.cpp computes f32 projections when decoding.
//!
//! Decoding reads every weight once per token, so its speed is the rate at which each core
//! streams them. [`super::dense_matmul`] reads the transposed weight `[k, n]` in panels of 64
//! columns, 256 bytes of each weight row at a time; here each thread takes a range of output
//! rows and reads them front to back, one sequential stream. On SmolLM2-135M in F32 (2 cores,
//! AMD EPYC) greedy decoding went from 29–34 to 43–44 tokens/s.
//!
//! With AVX-512 a tile is up to four activation rows against four weight rows, in 16
//! registers of 16 lanes; with AVX2 alone, two activation rows against three weight rows, 12
//! pairs of 8-lane registers. Full blocks of 16 load plainly and only the last is masked:
//! masked loads in every block made AVX2-only decoding 2–3× slower (SmolLM2 F32, one token
//! after 256 on a Zen 3 EPYC: 92 ms, 30–43 ms after). Blocks of 64 activation rows stay in
//! cache while a group of weight rows meets all their tiles, so the weights are read once
//! per 64 rows. That also serves a prompt's
//! many rows: after 256 tokens, 64 tokens took 213 ms against 229 ms through candle's GEMM
//! over the transposed weight, and the whole `zoo bench verify` run (prefill included) 4.5 s
//! against 7.6 s. Every output has the same
//! bits on every path and in any call: lane `l` sums `x[i]·w[i]` for `i ≡ l (mod 16)` in order
//! by fused multiply-adds from zero, and the 16 lanes are then added in one fixed tree
//! ([`reduce`]). A row's result therefore does not depend on the other rows of the call, which
//! keeps verifying drafts in one forward exact.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::reduce512;

/// Lanes of the partial sums: one AVX-512 register, two AVX2 ones.
const LANES: usize = 16;
/// Activation rows per block: a block stays in cache while every weight row meets it.
#[cfg(target_arch = "x86_64")]
const BLOCK: usize = 64;

/// A pointer to the output, written by tasks in disjoint columns.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: the tasks of one call write disjoint output columns, and the call waits for them.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// `(x, m, k, w, n, j0, j1, out)`: columns `j0..j1` of every row.
type Range = unsafe fn(&[f32], usize, usize, &[f32], usize, usize, usize, Out);

/// `out[m, n] = x[m, k] · w[n, k]ᵀ`, all row-major.
pub fn matmul(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
    assert!(x.len() >= m * k && w.len() >= n * k && out.len() >= m * n);
    let range = best();
    // Two ranges per thread, so that a thread that finishes early takes over work.
    let threads = rayon::current_num_threads().max(1);
    let chunk = n.div_ceil(2 * threads).next_multiple_of(4);
    let dst = Out(out.as_mut_ptr());
    (0..n.div_ceil(chunk)).into_par_iter().for_each(|c| {
        let j0 = c * chunk;
        // SAFETY: the slices hold the sizes asserted above, the task writes columns
        // `j0..j0 + chunk` of `out` only, and `best` chose a kernel this CPU runs.
        unsafe { range(x, m, k, w, n, j0, (j0 + chunk).min(n), dst) }
    });
}

fn best() -> Range {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return x86::range_avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return x86::range_avx2;
        }
    }
    range_scalar
}

/// The sum of 16 lanes, in the order every path uses: halves, then quarters, then pairs.
fn reduce(v: [f32; LANES]) -> f32 {
    let a: [f32; 8] = std::array::from_fn(|i| v[i] + v[i + 8]);
    let b: [f32; 4] = std::array::from_fn(|i| a[i] + a[i + 4]);
    let c: [f32; 2] = std::array::from_fn(|i| b[i] + b[i + 2]);
    c[0] + c[1]
}

/// Columns `j0..j1` of every row, in plain Rust.
///
/// # Safety
/// `out` points at `m × n` floats that no other thread writes in these columns.
#[allow(clippy::too_many_arguments)]
unsafe fn range_scalar(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    j0: usize,
    j1: usize,
    out: Out,
) {
    for r in 0..m {
        let xr = &x[r * k..(r + 1) * k];
        for j in j0..j1 {
            let wr = &w[j * k..(j + 1) * k];
            let mut lanes = [0f32; LANES];
            for (i, (&xv, &wv)) in xr.iter().zip(wr).enumerate() {
                lanes[i % LANES] = xv.mul_add(wv, lanes[i % LANES]);
            }
            // The vector paths add the masked-off lanes of the last block as zeros.
            for i in k..k.next_multiple_of(LANES) {
                lanes[i % LANES] = 0f32.mul_add(0.0, lanes[i % LANES]);
            }
            // SAFETY: row `r`, column `j` is inside `out` and this task's own.
            unsafe { *out.0.add(r * n + j) = reduce(lanes) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Out, BLOCK, LANES};

    use std::arch::x86_64::*;

    /// # Safety
    /// As [`super::range_scalar`], on a CPU with AVX-512F.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn range_avx512(
        x: &[f32],
        m: usize,
        k: usize,
        w: &[f32],
        n: usize,
        j0: usize,
        j1: usize,
        out: Out,
    ) {
        let full = k / LANES;
        // The last block's lanes past `k` are not read, and add zeros.
        let tail: __mmask16 = ((1u32 << (k % LANES)) - 1) as u16;
        // Blocks of activation rows that stay in cache while each group of four weight rows
        // meets all their tiles: the weights are read once per block.
        for rb in (0..m).step_by(BLOCK) {
            for j in (j0..j1).step_by(4) {
                let cols = 4.min(j1 - j);
                // Weight rows past `j1` repeat the last one; their sums are not stored.
                let wp: [*const f32; 4] =
                    std::array::from_fn(|c| w.as_ptr().add((j + c.min(cols - 1)) * k));
                let block_end = m.min(rb + BLOCK);
                // With several activation rows a group's tiles compute longer than its
                // weights take to arrive, and the hardware prefetcher does not run that far
                // ahead: the first tile asks for the rows of the group after next, which
                // stream in while the tiles compute. SmolLM2-135M's projections in F32 on 2
                // cores of a Sapphire Rapids VM, medians of 6 alternated passes before → after:
                // 2 rows 27.6 → 22.2 ms, 4 rows 32.6 → 24.2, 8 rows 37.7 → 32.8 (one row
                // 23.9 and 25.5, unchanged); the next group instead of the one after did as
                // well, and spreading the prefetches over every tile worse.
                let ahead = (block_end - rb > 1 && j + 8 < j1).then(|| {
                    let next: [*const f32; 4] =
                        std::array::from_fn(|c| w.as_ptr().add((j + 8 + c).min(j1 - 1) * k));
                    next
                });
                for r0 in (rb..block_end).step_by(4) {
                    let rows = 4.min(m - r0);
                    let xp = x.as_ptr().add(r0 * k);
                    let ahead = if r0 == rb { ahead } else { None };
                    let mut acc = [[_mm512_setzero_ps(); 4]; 4];
                    let mut step = |b: usize, mask: __mmask16| {
                        if let Some(next) = ahead {
                            for row in next {
                                _mm_prefetch::<_MM_HINT_T0>(row.add(b * LANES).cast());
                            }
                        }
                        let wv: [__m512; 4] = std::array::from_fn(|c| {
                            _mm512_maskz_loadu_ps(mask, wp[c].add(b * LANES))
                        });
                        for (r, acc) in acc.iter_mut().enumerate().take(rows) {
                            let xv = _mm512_maskz_loadu_ps(mask, xp.add(r * k + b * LANES));
                            for c in 0..4 {
                                acc[c] = _mm512_fmadd_ps(xv, wv[c], acc[c]);
                            }
                        }
                    };
                    for b in 0..full {
                        step(b, 0xffff);
                    }
                    if tail != 0 {
                        step(full, tail);
                    }
                    for (r, acc) in acc.iter().enumerate().take(rows) {
                        for (c, &v) in acc.iter().enumerate().take(cols) {
                            *out.0.add((r0 + r) * n + j + c) = reduce512(v);
                        }
                    }
                }
            }
        }
    }

    /// [`super::reduce`] in registers: the same additions in the same order.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[inline(always)]
    pub(crate) unsafe fn reduce512(v: __m512) -> f32 {
        // Lanes 8..16 onto 0..8, then 4..8 onto 0..4, 2..4 onto 0..2, 1 onto 0.
        let a = _mm512_add_ps(v, _mm512_shuffle_f32x4::<0b01_00_11_10>(v, v));
        let a = _mm512_castps512_ps256(a);
        let b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
        let c = _mm_add_ps(b, _mm_movehl_ps(b, b));
        _mm_cvtss_f32(_mm_add_ss(c, _mm_shuffle_ps::<1>(c, c)))
    }

    /// Weight rows per AVX2 tile; with [`AVX2_ROWS`] activation rows and two registers per
    /// sum that is 12 accumulators, and the three weight registers fill the other four.
    const AVX2_COLS: usize = 3;
    /// Activation rows per AVX2 tile.
    const AVX2_ROWS: usize = 2;

    /// # Safety
    /// As [`super::range_scalar`], on a CPU with AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn range_avx2(
        x: &[f32],
        m: usize,
        k: usize,
        w: &[f32],
        n: usize,
        j0: usize,
        j1: usize,
        out: Out,
    ) {
        // Lanes 0..8 and 8..16 of each block of 16 in two registers. The full blocks load
        // plainly; the last block's lanes past `k` are masked off and add zeros.
        let full = k / LANES;
        let rest = k % LANES;
        let mask = |count: usize| -> __m256i {
            let lanes: [i32; 8] = std::array::from_fn(|i| -i32::from(i < count));
            _mm256_loadu_si256(lanes.as_ptr().cast())
        };
        let tail = (rest != 0).then(|| [mask(rest.min(8)), mask(rest.saturating_sub(8))]);
        const C: usize = AVX2_COLS;
        for rb in (0..m).step_by(BLOCK) {
            let block_end = m.min(rb + BLOCK);
            for j in (j0..j1).step_by(C) {
                let cols = C.min(j1 - j);
                // Weight rows past `j1` repeat the last one; their sums are not stored.
                let wp: [*const f32; C] =
                    std::array::from_fn(|c| w.as_ptr().add((j + c.min(cols - 1)) * k));
                // With several activation rows the group's tiles compute longer than its
                // weights take to arrive, and the hardware prefetcher does not run that far
                // ahead: the first tile asks for the next group's rows, which then stream in
                // while the group's other tiles compute.
                let ahead = (block_end - rb > 1 && j + C < j1).then(|| {
                    let next: [*const f32; C] =
                        std::array::from_fn(|c| w.as_ptr().add((j + C + c).min(j1 - 1) * k));
                    next
                });
                let mut r0 = rb;
                while r0 < block_end {
                    let xp = x.as_ptr().add(r0 * k);
                    let dst = out.0.add(r0 * n + j);
                    let ahead = if r0 == rb { ahead } else { None };
                    if block_end - r0 >= AVX2_ROWS {
                        let acc = tile_avx2::<AVX2_ROWS, C>(xp, k, wp, full, tail, ahead);
                        store_avx2(&acc, cols, dst, n);
                        r0 += AVX2_ROWS;
                    } else {
                        let acc = tile_avx2::<1, C>(xp, k, wp, full, tail, ahead);
                        store_avx2(&acc, cols, dst, n);
                        r0 += 1;
                    }
                }
            }
        }
    }

    /// The 16-lane sums of `R` activation rows (`k` apart from `x`) against the `C` weight
    /// rows `w`, each as two registers of 8 lanes; the weight rows `ahead` are prefetched a
    /// cache line per row and block on the way.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tile_avx2<const R: usize, const C: usize>(
        x: *const f32,
        k: usize,
        w: [*const f32; C],
        full: usize,
        tail: Option<[__m256i; 2]>,
        ahead: Option<[*const f32; C]>,
    ) -> [[[__m256; 2]; C]; R] {
        let mut acc = [[[_mm256_setzero_ps(); 2]; C]; R];
        for b in 0..full {
            if let Some(next) = ahead {
                for row in next {
                    _mm_prefetch::<_MM_HINT_T0>(row.add(b * LANES).cast());
                }
            }
            for h in 0..2 {
                let at = b * LANES + 8 * h;
                let mut wv = [_mm256_setzero_ps(); C];
                for c in 0..C {
                    wv[c] = _mm256_loadu_ps(w[c].add(at));
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let xv = _mm256_loadu_ps(x.add(r * k + at));
                    for c in 0..C {
                        acc[c][h] = _mm256_fmadd_ps(xv, wv[c], acc[c][h]);
                    }
                }
            }
        }
        if let Some(mk) = tail {
            for h in 0..2 {
                let at = full * LANES + 8 * h;
                let mut wv = [_mm256_setzero_ps(); C];
                for c in 0..C {
                    wv[c] = _mm256_maskload_ps(w[c].add(at), mk[h]);
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let xv = _mm256_maskload_ps(x.add(r * k + at), mk[h]);
                    for c in 0..C {
                        acc[c][h] = _mm256_fmadd_ps(xv, wv[c], acc[c][h]);
                    }
                }
            }
        }
        acc
    }

    /// Writes the first `cols` sums of each row of a tile at `dst`, rows `n` apart.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn store_avx2<const R: usize, const C: usize>(
        acc: &[[[__m256; 2]; C]; R],
        cols: usize,
        dst: *mut f32,
        n: usize,
    ) {
        for (r, acc) in acc.iter().enumerate() {
            for (c, v) in acc.iter().enumerate().take(cols) {
                *dst.add(r * n + c) = reduce256(v[0], v[1]);
            }
        }
    }

    /// [`super::reduce`] of lanes `lo` (0..8) and `hi` (8..16) in registers: the same
    /// additions in the same order.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn reduce256(lo: __m256, hi: __m256) -> f32 {
        let a = _mm256_add_ps(lo, hi);
        let b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
        let c = _mm_add_ps(b, _mm_movehl_ps(b, b));
        _mm_cvtss_f32(_mm_add_ss(c, _mm_shuffle_ps::<1>(c, c)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every path against plain arithmetic (within rounding) and against each other bit for
    /// bit, odd shapes, and each row's bits the same alone and in a call of many rows.
    #[test]
    fn rows_match_plain_arithmetic_and_have_the_same_bits_on_every_path_and_in_any_call() {
        let mut seed = 7u64;
        let mut rand = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        for (m, k, n) in [
            (1, 5, 3),
            (7, 33, 70),
            (13, 64, 129),
            (32, 96, 64),
            (1, 576, 576),
            (3, 17, 9),
            (5, 1, 7),
            (6, 24, 11),
            (4, 30, 8),
            (2, 576, 13),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| rand()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rand()).collect();
            let mut got = vec![0f32; m * n];
            matmul(&x, m, k, &w, n, &mut got);
            for r in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|i| f64::from(x[r * k + i]) * f64::from(w[j * k + i]))
                        .sum();
                    let g = got[r * n + j];
                    assert!(
                        (f64::from(g) - want).abs() < 1e-4,
                        "{m}×{k}×{n}: {g} against {want}"
                    );
                }
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
            let mut paths: Vec<(&str, Range)> = vec![("plain Rust", range_scalar)];
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    paths.push(("AVX-512", x86::range_avx512));
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    paths.push(("AVX2", x86::range_avx2));
                }
            }
            for (name, path) in paths {
                let mut one = vec![0f32; m * n];
                // SAFETY: one thread, all columns, on a CPU that runs `path`.
                unsafe { path(&x, m, k, &w, n, 0, n, Out(one.as_mut_ptr())) };
                assert_eq!(bits(&one), bits(&got), "{m}×{k}×{n}: {name}");
            }
            for r in 0..m {
                let mut alone = vec![0f32; n];
                matmul(&x[r * k..(r + 1) * k], 1, k, &w, n, &mut alone);
                assert_eq!(
                    bits(&alone),
                    bits(&got[r * n..(r + 1) * n]),
                    "row {r} alone"
                );
            }
        }
    }
}
