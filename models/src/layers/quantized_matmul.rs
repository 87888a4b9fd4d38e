//! `y = x Wᵀ` on the CPU for a ggml-quantized `W` `[n, k]` (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and
//! a few rows of f32 `x` `[m, k]`, reading each weight block once for up to [`ROWS`] rows.
//!
//! Candle's quantized CPU matmul streams every weight once per activation row (candle issue
//! 3707), so verifying k drafted tokens costs k passes over the weights, and Q4_1 has no
//! vectorised dot product at all. Here the activations are quantized once to 8-bit blocks of 32
//! (scale `dx`, values `qx`, and their sum), as ggml does; each weight block is decoded once to
//! 32 unsigned bytes `u` with its scale `d` and offset `c` (`w = d·u + c`: Q4_0 `c = −8d`,
//! Q4_1 `c = m`, Q5_0 `c = −16d`, Q5_1 `c = m`, Q8_0 `u = q + 128`, `c = −128d`), and for every
//! row `w·x = dx·(d·Σ u·qx + c·Σ qx)`. The byte dot product is AVX-512 VNNI `vpdpbusd` or
//! AVX-VNNI where the CPU has them, AVX2 `vpmaddubsw` otherwise (chosen at run time), plain
//! Rust elsewhere. Output columns are split across threads.

use half::f16;
use rayon::prelude::*;

use candle_core::quantized::GgmlDType;

/// Block width of every supported type.
pub const BLOCK: usize = 32;
/// Activation rows served by one pass over the weights.
pub const ROWS: usize = 64;
/// Output columns per parallel task.
const COLUMNS_PER_TASK: usize = 32;

/// Whether [`matmul`] handles weights of `dtype`.
pub fn supports(dtype: GgmlDType) -> bool {
    matches!(
        dtype,
        GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q8_0
    )
}

/// One block of 32 activations quantized to bytes.
#[derive(Clone, Copy)]
struct QBlock {
    qx: [i8; BLOCK],
    dx: f32,
    sum: i32,
}

/// ggml's `quantize_row_q8_0`/`q8_1` of one block: `dx = max|x| / 127`, `qx = round(x / dx)`.
fn quantize_block(x: &[f32]) -> QBlock {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let dx = amax / 127.0;
    let inv = if dx > 0.0 { 1.0 / dx } else { 0.0 };
    let mut qx = [0i8; BLOCK];
    let mut sum = 0i32;
    for (q, &v) in qx.iter_mut().zip(x) {
        *q = (v * inv).round() as i8;
        sum += i32::from(*q);
    }
    QBlock { qx, dx, sum }
}

/// A ggml block format: its size, and its decoding into unsigned bytes `u`, scale and offset
/// (`w = d·u + c`), given the block's scale(s) already converted from f16.
trait Format {
    const BYTES: usize;
    /// Writes the block's 32 values as unsigned bytes into `u` and returns the offset `c`,
    /// given its scale `d` and min `m` (0 for types without one).
    fn decode(b: &[u8], d: f32, m: f32, u: &mut [u8; BLOCK]) -> f32;
    /// Whether the block stores a min after its scale (the `_1` types).
    fn has_min() -> bool;
}

struct Q4_0;
struct Q4_1;
struct Q5_0;
struct Q5_1;
struct Q8_0;

#[inline(always)]
fn nibbles(qs: &[u8], u: &mut [u8; BLOCK]) {
    for j in 0..16 {
        u[j] = qs[j] & 0x0F;
        u[j + 16] = qs[j] >> 4;
    }
}

#[inline(always)]
fn fifth_bits(qh: &[u8], u: &mut [u8; BLOCK]) {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    for (j, v) in u.iter_mut().enumerate() {
        *v |= (((qh >> j) & 1) as u8) << 4;
    }
}

impl Format for Q4_0 {
    const BYTES: usize = 18;
    #[inline(always)]
    fn decode(b: &[u8], d: f32, _: f32, u: &mut [u8; BLOCK]) -> f32 {
        nibbles(&b[2..18], u);
        -8.0 * d
    }
    fn has_min() -> bool {
        false
    }
}

impl Format for Q4_1 {
    const BYTES: usize = 20;
    #[inline(always)]
    fn decode(b: &[u8], _: f32, m: f32, u: &mut [u8; BLOCK]) -> f32 {
        nibbles(&b[4..20], u);
        m
    }
    fn has_min() -> bool {
        true
    }
}

impl Format for Q5_0 {
    const BYTES: usize = 22;
    #[inline(always)]
    fn decode(b: &[u8], d: f32, _: f32, u: &mut [u8; BLOCK]) -> f32 {
        nibbles(&b[6..22], u);
        fifth_bits(&b[2..6], u);
        -16.0 * d
    }
    fn has_min() -> bool {
        false
    }
}

impl Format for Q5_1 {
    const BYTES: usize = 24;
    #[inline(always)]
    fn decode(b: &[u8], _: f32, m: f32, u: &mut [u8; BLOCK]) -> f32 {
        nibbles(&b[8..24], u);
        fifth_bits(&b[4..8], u);
        m
    }
    fn has_min() -> bool {
        true
    }
}

impl Format for Q8_0 {
    const BYTES: usize = 34;
    #[inline(always)]
    fn decode(b: &[u8], d: f32, _: f32, u: &mut [u8; BLOCK]) -> f32 {
        for j in 0..BLOCK {
            u[j] = b[2 + j] ^ 0x80;
        }
        -128.0 * d
    }
    fn has_min() -> bool {
        false
    }
}

/// The instruction set a pass is compiled for: its byte dot product and f16 conversion.
trait Isa {
    fn dot(u: &[u8; BLOCK], q: &[i8; BLOCK]) -> i32;
    fn f16(bits: u16) -> f32;
}

struct Scalar;

impl Isa for Scalar {
    #[inline(always)]
    fn dot(u: &[u8; BLOCK], q: &[i8; BLOCK]) -> i32 {
        u.iter()
            .zip(q)
            .map(|(&a, &b)| i32::from(a) * i32::from(b))
            .sum()
    }
    #[inline(always)]
    fn f16(bits: u16) -> f32 {
        f16::from_bits(bits).to_f32()
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Isa, BLOCK};
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn load(u: &[u8; BLOCK], q: &[i8; BLOCK]) -> (__m256i, __m256i) {
        (
            _mm256_loadu_si256(u.as_ptr() as *const __m256i),
            _mm256_loadu_si256(q.as_ptr() as *const __m256i),
        )
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        _mm_cvtsi128_si32(s)
    }

    #[inline(always)]
    unsafe fn f16c(bits: u16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
    }

    /// AVX-512 VNNI `vpdpbusd` on 256-bit registers.
    pub struct Vnni512;
    impl Isa for Vnni512 {
        #[inline(always)]
        fn dot(u: &[u8; BLOCK], q: &[i8; BLOCK]) -> i32 {
            // SAFETY: only called inside passes compiled with these features, which run only
            // where the CPU reports them.
            unsafe {
                let (a, b) = load(u, q);
                hsum(_mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b))
            }
        }
        #[inline(always)]
        fn f16(bits: u16) -> f32 {
            // SAFETY: as above.
            unsafe { f16c(bits) }
        }
    }

    /// AVX-VNNI (the VEX form of `vpdpbusd`).
    pub struct AvxVnni;
    impl Isa for AvxVnni {
        #[inline(always)]
        fn dot(u: &[u8; BLOCK], q: &[i8; BLOCK]) -> i32 {
            // SAFETY: as for Vnni512.
            unsafe {
                let (a, b) = load(u, q);
                hsum(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a, b))
            }
        }
        #[inline(always)]
        fn f16(bits: u16) -> f32 {
            // SAFETY: as for Vnni512.
            unsafe { f16c(bits) }
        }
    }

    /// AVX2 `vpmaddubsw`, which saturates pairs past i16 (`u ≤ 255` against `|q| ≤ 127`), so
    /// the bytes are split into their low 7 bits and the top bit: `u = lo + 128·hi`.
    pub struct Avx2;
    impl Isa for Avx2 {
        #[inline(always)]
        fn dot(u: &[u8; BLOCK], q: &[i8; BLOCK]) -> i32 {
            // SAFETY: as for Vnni512.
            unsafe {
                let (a, b) = load(u, q);
                let lo = _mm256_and_si256(a, _mm256_set1_epi8(0x7F));
                let hi = _mm256_and_si256(_mm256_srli_epi16(a, 7), _mm256_set1_epi8(1));
                let ones = _mm256_set1_epi16(1);
                let plo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, b), ones);
                let phi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, b), ones);
                hsum(_mm256_add_epi32(plo, _mm256_slli_epi32(phi, 7)))
            }
        }
        #[inline(always)]
        fn f16(bits: u16) -> f32 {
            // SAFETY: as for Vnni512.
            unsafe { f16c(bits) }
        }
    }
}

/// The output columns `col0..` of one task for a tile of `rows` activation rows: `chunk` holds
/// `rows` sums per column.
#[inline(always)]
fn columns<F: Format, I: Isa>(
    weight: &[u8],
    row_bytes: usize,
    qx: &[QBlock],
    rows: usize,
    col0: usize,
    chunk: &mut [f32],
) {
    let mut u = [0u8; BLOCK];
    for (c, acc) in chunk.chunks_mut(rows).enumerate() {
        let w = &weight[(col0 + c) * row_bytes..(col0 + c + 1) * row_bytes];
        for (b, block) in w.chunks_exact(F::BYTES).enumerate() {
            let d = I::f16(u16::from_le_bytes([block[0], block[1]]));
            let m = if F::has_min() {
                I::f16(u16::from_le_bytes([block[2], block[3]]))
            } else {
                0.0
            };
            let off = F::decode(block, d, m, &mut u);
            for (a, q) in acc.iter_mut().zip(&qx[b * rows..(b + 1) * rows]) {
                let s = I::dot(&u, &q.qx) as f32;
                *a += q.dx * (d * s + off * q.sum as f32);
            }
        }
    }
}

type Pass = fn(&[u8], usize, &[QBlock], usize, usize, &mut [f32]);

/// The pass for format `F` on this CPU.
fn pass<F: Format>() -> Pass {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        unsafe fn vnni512<F: Format>(
            w: &[u8],
            rb: usize,
            q: &[QBlock],
            r: usize,
            c: usize,
            o: &mut [f32],
        ) {
            columns::<F, x86::Vnni512>(w, rb, q, r, c, o)
        }
        #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
        unsafe fn avxvnni<F: Format>(
            w: &[u8],
            rb: usize,
            q: &[QBlock],
            r: usize,
            c: usize,
            o: &mut [f32],
        ) {
            columns::<F, x86::AvxVnni>(w, rb, q, r, c, o)
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn avx2<F: Format>(
            w: &[u8],
            rb: usize,
            q: &[QBlock],
            r: usize,
            c: usize,
            o: &mut [f32],
        ) {
            columns::<F, x86::Avx2>(w, rb, q, r, c, o)
        }
        use std::arch::is_x86_feature_detected as has;
        let base = has!("avx2") && has!("fma") && has!("f16c");
        if base && has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni") {
            // SAFETY: the CPU has every feature the pass is compiled for.
            return |w, rb, q, r, c, o| unsafe { vnni512::<F>(w, rb, q, r, c, o) };
        }
        if base && has!("avxvnni") {
            // SAFETY: as above.
            return |w, rb, q, r, c, o| unsafe { avxvnni::<F>(w, rb, q, r, c, o) };
        }
        if base {
            // SAFETY: as above.
            return |w, rb, q, r, c, o| unsafe { avx2::<F>(w, rb, q, r, c, o) };
        }
    }
    columns::<F, Scalar>
}

/// `out[m, n] = x[m, k] · Wᵀ` for `weight`, the bytes of an `[n, k]` tensor of `dtype`
/// (`k` a multiple of 32). Returns `false`, untouched, for an unsupported type.
pub fn matmul(
    x: &[f32],
    m: usize,
    k: usize,
    weight: &[u8],
    dtype: GgmlDType,
    n: usize,
    out: &mut [f32],
) -> bool {
    let (pass, bytes): (Pass, usize) = match dtype {
        GgmlDType::Q4_0 => (pass::<Q4_0>(), Q4_0::BYTES),
        GgmlDType::Q4_1 => (pass::<Q4_1>(), Q4_1::BYTES),
        GgmlDType::Q5_0 => (pass::<Q5_0>(), Q5_0::BYTES),
        GgmlDType::Q5_1 => (pass::<Q5_1>(), Q5_1::BYTES),
        GgmlDType::Q8_0 => (pass::<Q8_0>(), Q8_0::BYTES),
        _ => return false,
    };
    if !k.is_multiple_of(BLOCK) {
        return false;
    }
    let blocks = k / BLOCK;
    let row_bytes = blocks * bytes;
    assert_eq!(
        weight.len(),
        n * row_bytes,
        "weight bytes of [{n}, {k}] {dtype:?}"
    );
    assert_eq!(x.len(), m * k);
    assert_eq!(out.len(), m * n);
    for r0 in (0..m).step_by(ROWS) {
        let rows = (m - r0).min(ROWS);
        // Activations block-major: every row's block b together, read once per weight block.
        let mut qx = Vec::with_capacity(blocks * rows);
        for b in 0..blocks {
            for r in 0..rows {
                let start = (r0 + r) * k + b * BLOCK;
                qx.push(quantize_block(&x[start..start + BLOCK]));
            }
        }
        // Column-major sums of this row tile, transposed into `out` after.
        let mut tile = vec![0f32; n * rows];
        tile.par_chunks_mut(COLUMNS_PER_TASK * rows)
            .enumerate()
            .for_each(|(task, chunk)| {
                pass(weight, row_bytes, &qx, rows, task * COLUMNS_PER_TASK, chunk)
            });
        for (col, acc) in tile.chunks(rows).enumerate() {
            for (r, &v) in acc.iter().enumerate() {
                out[(r0 + r) * n + col] = v;
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dot_product_agrees_with_plain_arithmetic() {
        let mut u = [0u8; BLOCK];
        let mut q = [0i8; BLOCK];
        for i in 0..BLOCK {
            u[i] = (i * 37 % 256) as u8;
            q[i] = ((i as i32 * 53 % 255) - 127) as i8;
        }
        u[0] = 255;
        u[1] = 255;
        q[0] = -127;
        q[1] = -127;
        let want = Scalar::dot(&u, &q);
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") {
                assert_eq!(x86::Avx2::dot(&u, &q), want);
            }
            if has!("avx512vnni") && has!("avx512vl") {
                assert_eq!(x86::Vnni512::dot(&u, &q), want);
            }
            if has!("avxvnni") {
                assert_eq!(x86::AvxVnni::dot(&u, &q), want);
            }
        }
    }
}
