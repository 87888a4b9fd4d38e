//! Vectorisable elementwise math for the CPU kernels: a branch-free `exp` and a parallel map
//! compiled for AVX-512 and AVX2 and chosen at run time. Candle's CPU unary ops call libm's
//! scalar functions on one thread.

use rayon::prelude::*;

/// `exp(x)` for f32 as Cephes' `expf` computes it (Moshier 1992): `x = n·ln 2 + r` with
/// `|r| ≤ ln 2 / 2`, a degree-6 polynomial for `exp(r)`, and `2ⁿ` put in the exponent bits;
/// relative error about 1e-7. Written without branches or library calls so that loops over it
/// vectorise; `-inf` (a masked score) and anything below −87.3 give exactly 0.
#[inline(always)]
pub(crate) fn exp_poly(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer in plain arithmetic.
    const ROUND: f32 = 12_582_912.0;
    let clamped = x.clamp(-87.3, 88.7);
    let n = (clamped * LOG2E + ROUND) - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.3 {
        0.0
    } else {
        y * scale
    }
}

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

#[inline(always)]
fn map_chunk<F: Fn(f32) -> f32>(src: &[f32], dst: &mut [f32], f: &F) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f(s);
    }
}

#[inline(always)]
fn zip_chunk<F: Fn(f32, f32) -> f32>(a: &[f32], b: &[f32], dst: &mut [f32], f: &F) {
    for ((d, &x), &y) in dst.iter_mut().zip(a).zip(b) {
        *d = f(x, y);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn map_chunk_avx512<F: Fn(f32) -> f32>(src: &[f32], dst: &mut [f32], f: &F) {
    map_chunk(src, dst, f)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn map_chunk_avx2<F: Fn(f32) -> f32>(src: &[f32], dst: &mut [f32], f: &F) {
    map_chunk(src, dst, f)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn zip_chunk_avx512<F: Fn(f32, f32) -> f32>(a: &[f32], b: &[f32], dst: &mut [f32], f: &F) {
    zip_chunk(a, b, dst, f)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn zip_chunk_avx2<F: Fn(f32, f32) -> f32>(a: &[f32], b: &[f32], dst: &mut [f32], f: &F) {
    zip_chunk(a, b, dst, f)
}

#[derive(Clone, Copy)]
enum Isa {
    Generic,
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Isa::Avx2;
        }
    }
    Isa::Generic
}

/// `f` over every element of `src`, in parallel chunks, with the widest vectors the CPU has.
pub(crate) fn par_map<F: Fn(f32) -> f32 + Sync>(src: &[f32], f: F) -> Vec<f32> {
    let mut dst = vec![0f32; src.len()];
    let isa = isa();
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| match isa {
            // SAFETY: the CPU has the features these were compiled for.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { map_chunk_avx512(s, d, &f) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { map_chunk_avx2(s, d, &f) },
            Isa::Generic => map_chunk(s, d, &f),
        });
    dst
}

/// `f(a[i], b[i])` for every element, as [`par_map`].
pub(crate) fn par_zip<F: Fn(f32, f32) -> f32 + Sync>(a: &[f32], b: &[f32], f: F) -> Vec<f32> {
    let mut dst = vec![0f32; a.len()];
    dst.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(d, (x, y))| zip_into(x, y, d, &f));
    dst
}

/// `dst[i] = f(a[i], b[i])` on the calling thread, with the widest vectors the CPU has.
pub(crate) fn zip_into<F: Fn(f32, f32) -> f32>(a: &[f32], b: &[f32], dst: &mut [f32], f: &F) {
    match isa() {
        // SAFETY: the CPU has the features these were compiled for.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { zip_chunk_avx512(a, b, dst, f) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { zip_chunk_avx2(a, b, dst, f) },
        Isa::Generic => zip_chunk(a, b, dst, f),
    }
}

/// `tanh(x) = 1 − 2 / (e^{2x} + 1)`, exact to about 1e-7 where it matters, ±1 at the ends.
#[inline(always)]
pub(crate) fn tanh_poly(x: f32) -> f32 {
    1.0 - 2.0 / (exp_poly(2.0 * x) + 1.0)
}

/// The logistic function `1 / (1 + e^{−x})`.
#[inline(always)]
pub(crate) fn sigmoid_poly(x: f32) -> f32 {
    1.0 / (1.0 + exp_poly(-x))
}
