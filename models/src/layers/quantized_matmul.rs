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
    /// `dx · sum`, which the offset of a weight block multiplies (in the x86 kernels).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    s: f32,
}

/// `x` rounded to the nearest integer, ties to even, for `|x| ≤ 2²²`: adding and taking away
/// 1.5·2²³ leaves no fraction bits. ggml's AVX quantization rounds so (`_MM_ROUND_NEAREST`);
/// `f32::round` is a call into libm on x86-64's baseline.
#[inline(always)]
fn round_even(x: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0;
    (x + SHIFT) - SHIFT
}

/// ggml's `quantize_row_q8_0`/`q8_1` of one block: `dx = max|x| / 127`, `qx = round(x / dx)`.
fn quantize_block(x: &[f32]) -> QBlock {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let dx = amax / 127.0;
    let inv = if dx > 0.0 { 1.0 / dx } else { 0.0 };
    let mut qx = [0i8; BLOCK];
    let mut sum = 0i32;
    for (q, &v) in qx.iter_mut().zip(x) {
        *q = round_even(v * inv) as i8;
        sum += i32::from(*q);
    }
    QBlock {
        qx,
        dx,
        sum,
        s: dx * sum as f32,
    }
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

/// The output columns `col0..` of one task for a tile of `rows` activation rows, in plain
/// Rust: `chunk` holds `rows` sums per column.
fn columns_scalar<F: Format>(
    weight: &[u8],
    row_bytes: usize,
    qx: &[QBlock],
    rows: usize,
    col0: usize,
    chunk: &mut [f32],
) {
    let mut u = [0u8; BLOCK];
    let half = |lo: u8, hi: u8| f16::from_le_bytes([lo, hi]).to_f32();
    for (c, acc) in chunk.chunks_mut(rows).enumerate() {
        let w = &weight[(col0 + c) * row_bytes..(col0 + c + 1) * row_bytes];
        for (b, block) in w.chunks_exact(F::BYTES).enumerate() {
            let d = half(block[0], block[1]);
            let m = if F::has_min() {
                half(block[2], block[3])
            } else {
                0.0
            };
            let off = F::decode(block, d, m, &mut u);
            for (a, q) in acc.iter_mut().zip(&qx[b * rows..(b + 1) * rows]) {
                let s: i32 = u
                    .iter()
                    .zip(&q.qx)
                    .map(|(&x, &y)| i32::from(x) * i32::from(y))
                    .sum();
                *a += q.dx * (d * s as f32 + off * q.sum as f32);
            }
        }
    }
}

/// x86 passes: the weight block decoded into a register, the byte dot product kept in 8 i32
/// lanes and accumulated as floats per row, summed across lanes once per column.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Format, QBlock, BLOCK};
    use std::arch::x86_64::*;

    /// How 32 unsigned weight bytes meet 32 signed activation bytes.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Dot {
        /// AVX-512 VNNI `vpdpbusd` (EVEX, 256-bit).
        Vnni512,
        /// AVX-VNNI (the VEX form).
        AvxVnni,
        /// AVX2 `vpmaddubsw`: it saturates pairs past i16, which `u ≤ 255` against
        /// `|q| ≤ 127` can reach. Q8_0's signed weight bytes `w` are therefore not shifted:
        /// `|w|` meets `q` with `w`'s sign (ggml's trick), pairs at most 2·128·127.
        Avx2,
    }

    /// The byte dot products of weight bytes `u` (signed when `signed`, unsigned otherwise)
    /// and activation bytes `q`, summed in groups of four into 8 i32 lanes.
    #[inline(always)]
    unsafe fn dot<const D: u8>(u: __m256i, q: __m256i, signed: bool) -> __m256i {
        match D {
            0 => _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, q),
            1 => _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, q),
            _ => {
                let ones = _mm256_set1_epi16(1);
                if !signed {
                    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, q), ones);
                }
                let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(u, u), _mm256_sign_epi8(q, u));
                _mm256_madd_epi16(pairs, ones)
            }
        }
    }

    /// The block's scale and min (the f16 pair at its start; the min is garbage for types
    /// without one). The conversion reads memory directly: written with intrinsics, LLVM
    /// narrowed the load to a word inserted into a live register, which made each block wait
    /// for the previous block's accumulation (a false dependency through the register's other
    /// lanes).
    #[inline(always)]
    unsafe fn scales(block: &[u8]) -> (f32, f32) {
        assert!(block.len() >= 8);
        let dm: __m128;
        // SAFETY: reads 8 bytes of `block`; the caller's target features include F16C.
        std::arch::asm!(
            "vcvtph2ps {dm}, qword ptr [{p}]",
            p = in(reg) block.as_ptr(),
            dm = lateout(xmm_reg) dm,
            options(pure, readonly, nostack, preserves_flags),
        );
        (_mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_movehdup_ps(dm)))
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// The 32 values of a block as bytes in a register and the block's offset: unsigned
    /// bytes, except Q8_0's own signed ones (offset 0) for the AVX2 dot product ([`Dot::Avx2`]).
    #[inline(always)]
    unsafe fn load<F: Format, const D: u8>(
        block: &[u8],
        d: f32,
        m: f32,
        u: &mut [u8; BLOCK],
    ) -> (__m256i, f32) {
        match F::BYTES {
            // Q4_0, Q4_1: 16 bytes of nibbles, low halves first.
            18 | 20 => {
                let qs = _mm_loadu_si128(block.as_ptr().add(F::BYTES - 16) as *const __m128i);
                let mask = _mm_set1_epi8(0x0F);
                let lo = _mm_and_si128(qs, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
                let off = if F::has_min() { m } else { -8.0 * d };
                (_mm256_set_m128i(hi, lo), off)
            }
            // Q8_0: signed bytes, shifted by 128 for `vpdpbusd`.
            34 => {
                let q = _mm256_loadu_si256(block.as_ptr().add(2) as *const __m256i);
                if D == 2 {
                    return (q, 0.0);
                }
                (_mm256_xor_si256(q, _mm256_set1_epi8(-128)), -128.0 * d)
            }
            // Q5_0, Q5_1: the fifth bits spread in plain code.
            _ => {
                let off = F::decode(block, d, m, u);
                (_mm256_loadu_si256(u.as_ptr() as *const __m256i), off)
            }
        }
    }

    #[inline(always)]
    pub unsafe fn columns<F: Format, const D: u8>(
        weight: &[u8],
        row_bytes: usize,
        qx: &[QBlock],
        rows: usize,
        col0: usize,
        chunk: &mut [f32],
    ) {
        // Q8_0's bytes stay signed for the AVX2 dot product.
        let signed = D == 2 && F::BYTES == 34;
        let mut u = [0u8; BLOCK];
        for (c, out) in chunk.chunks_mut(rows).enumerate() {
            let w = &weight[(col0 + c) * row_bytes..(col0 + c + 1) * row_bytes];
            let mut r0 = 0;
            while rows - r0 >= 4 {
                tile::<F, D, 4>(w, qx, rows, r0, signed, &mut u, out);
                r0 += 4;
            }
            if rows - r0 >= 2 {
                tile::<F, D, 2>(w, qx, rows, r0, signed, &mut u, out);
                r0 += 2;
            }
            if rows > r0 {
                tile::<F, D, 1>(w, qx, rows, r0, signed, &mut u, out);
            }
        }
    }

    /// One column `w` against the `R` activation rows `r0..r0 + R` of a tile of `rows`, their
    /// sums in registers, two blocks at a time into independent even and odd accumulators. Every
    /// row goes through the same operations in the same order whatever `R` and the tile, so a
    /// row's result has the same bits in any tile: verifying drafts in one forward chooses
    /// exactly the tokens that decoding one at a time (`R = 1`) would.
    #[inline(always)]
    unsafe fn tile<F: Format, const D: u8, const R: usize>(
        w: &[u8],
        qx: &[QBlock],
        stride: usize,
        r0: usize,
        signed: bool,
        u: &mut [u8; BLOCK],
        out: &mut [f32],
    ) {
        let (mut a0, mut a1) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
        let (mut s0, mut s1) = ([0f32; R], [0f32; R]);
        let pairs = w.chunks_exact(2 * F::BYTES);
        let tail = pairs.remainder();
        let mut b = 0;
        let rows = &qx[r0..];
        for pair in pairs {
            step::<F, D, R>(
                &pair[..F::BYTES],
                &rows[b * stride..],
                signed,
                u,
                &mut a0,
                &mut s0,
            );
            step::<F, D, R>(
                &pair[F::BYTES..],
                &rows[(b + 1) * stride..],
                signed,
                u,
                &mut a1,
                &mut s1,
            );
            b += 2;
        }
        if !tail.is_empty() {
            step::<F, D, R>(tail, &rows[b * stride..], signed, u, &mut a0, &mut s0);
        }
        for i in 0..R {
            out[r0 + i] = hsum(_mm256_add_ps(a0[i], a1[i])) + s0[i] + s1[i];
        }
    }

    /// One weight block against the first `R` of `qx` (the rows' blocks at its index).
    #[inline(always)]
    unsafe fn step<F: Format, const D: u8, const R: usize>(
        block: &[u8],
        qx: &[QBlock],
        signed: bool,
        u: &mut [u8; BLOCK],
        acc: &mut [__m256; R],
        s: &mut [f32; R],
    ) {
        let (d, m) = scales(block);
        let m = if F::has_min() { m } else { 0.0 };
        let (wu, off) = load::<F, D>(block, d, m, u);
        for i in 0..R {
            let q = &qx[i];
            let x = _mm256_loadu_si256(q.qx.as_ptr() as *const __m256i);
            let p = _mm256_cvtepi32_ps(dot::<D>(wu, x, signed));
            acc[i] = _mm256_fmadd_ps(p, _mm256_set1_ps(d * q.dx), acc[i]);
            // Q8_0's signed bytes have no offset: no sum to carry from block to block.
            if !signed {
                s[i] += off * q.s;
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn vnni512<F: Format>(
        w: &[u8],
        rb: usize,
        q: &[QBlock],
        r: usize,
        c: usize,
        o: &mut [f32],
    ) {
        columns::<F, 0>(w, rb, q, r, c, o)
    }

    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    pub unsafe fn avx_vnni<F: Format>(
        w: &[u8],
        rb: usize,
        q: &[QBlock],
        r: usize,
        c: usize,
        o: &mut [f32],
    ) {
        columns::<F, 1>(w, rb, q, r, c, o)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn avx2<F: Format>(
        w: &[u8],
        rb: usize,
        q: &[QBlock],
        r: usize,
        c: usize,
        o: &mut [f32],
    ) {
        columns::<F, 2>(w, rb, q, r, c, o)
    }

    /// One group's `rows × 8` sums: interleaved Q8_0, Q4_0 or Q4_1 weights `w` against `rows`
    /// rows of row-major activation blocks.
    pub type Group = unsafe fn(&[u8], &[QBlock], usize, usize, &mut [f32]);

    /// The group kernel for `packing` with the dot product `dot`.
    pub fn group(packing: super::Packing, dot: Dot) -> Group {
        use super::Packing;
        match (packing, dot) {
            (Packing::Q8_0, Dot::Vnni512) => interleaved_vnni512::<0>,
            (Packing::Q4_0, Dot::Vnni512) => interleaved_vnni512::<1>,
            (Packing::Q4_1, Dot::Vnni512) => interleaved_vnni512::<2>,
            (Packing::Q8_0, Dot::AvxVnni) => interleaved_avx_vnni::<0>,
            (Packing::Q4_0, Dot::AvxVnni) => interleaved_avx_vnni::<1>,
            (Packing::Q4_1, Dot::AvxVnni) => interleaved_avx_vnni::<2>,
            (Packing::Q8_0, Dot::Avx2) => interleaved_avx2::<0>,
            (Packing::Q4_0, Dot::Avx2) => interleaved_avx2::<1>,
            (Packing::Q4_1, Dot::Avx2) => interleaved_avx2::<2>,
        }
    }

    /// # Safety
    /// `w` holds `blocks` group blocks of the packing `P` (0: Q8_0, 1: Q4_0, 2: Q4_1), `qx`
    /// `rows × blocks` activation blocks, `tile` `rows × 8` sums, on a CPU with AVX-512 VNNI.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn interleaved_vnni512<const P: u8>(
        w: &[u8],
        qx: &[QBlock],
        blocks: usize,
        rows: usize,
        tile: &mut [f32],
    ) {
        interleaved::<P, 0>(w, qx, blocks, rows, tile)
    }

    /// # Safety
    /// As [`interleaved_vnni512`], on a CPU with AVX-VNNI.
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    unsafe fn interleaved_avx_vnni<const P: u8>(
        w: &[u8],
        qx: &[QBlock],
        blocks: usize,
        rows: usize,
        tile: &mut [f32],
    ) {
        interleaved::<P, 1>(w, qx, blocks, rows, tile)
    }

    /// # Safety
    /// As [`interleaved_vnni512`], on a CPU with AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn interleaved_avx2<const P: u8>(
        w: &[u8],
        qx: &[QBlock],
        blocks: usize,
        rows: usize,
        tile: &mut [f32],
    ) {
        interleaved::<P, 2>(w, qx, blocks, rows, tile)
    }

    /// Four rows at a time, each weight run loaded once for them.
    #[inline(always)]
    unsafe fn interleaved<const P: u8, const D: u8>(
        w: &[u8],
        qx: &[QBlock],
        blocks: usize,
        rows: usize,
        tile: &mut [f32],
    ) {
        // No closure here: a closure would not inherit the caller's target features, and the
        // intrinsics inlined into it would become calls.
        let mut r0 = 0;
        while r0 < rows {
            let r = match rows - r0 {
                4.. => 4,
                2 | 3 => 2,
                _ => 1,
            };
            match (P, r) {
                (0, 4) => interleaved_q8_rows::<D, 4>(w, qx, blocks, r0, tile),
                (0, 2) => interleaved_q8_rows::<D, 2>(w, qx, blocks, r0, tile),
                (0, _) => interleaved_q8_rows::<D, 1>(w, qx, blocks, r0, tile),
                (1, 4) => interleaved_q4_rows::<false, D, 4>(w, qx, blocks, r0, tile),
                (1, 2) => interleaved_q4_rows::<false, D, 2>(w, qx, blocks, r0, tile),
                (1, _) => interleaved_q4_rows::<false, D, 1>(w, qx, blocks, r0, tile),
                (_, 4) => interleaved_q4_rows::<true, D, 4>(w, qx, blocks, r0, tile),
                (_, 2) => interleaved_q4_rows::<true, D, 2>(w, qx, blocks, r0, tile),
                (_, _) => interleaved_q4_rows::<true, D, 1>(w, qx, blocks, r0, tile),
            }
            r0 += r;
        }
    }

    /// The activations' 4-byte run `j` of row block `q`, in every 32-bit lane.
    #[inline(always)]
    unsafe fn broadcast_run(q: *const QBlock, j: usize) -> __m256i {
        _mm256_set1_epi32(
            (std::ptr::addr_of!((*q).qx) as *const i32)
                .add(j)
                .read_unaligned(),
        )
    }

    /// `sum` plus the products of unsigned bytes `u` and signed bytes `q`, four per 32-bit
    /// lane: `vpdpbusd` with VNNI (`D` 0 or 1). Not for AVX2, whose `vpmaddubsw` saturates.
    #[inline(always)]
    unsafe fn dot_add<const D: u8>(sum: __m256i, u: __m256i, q: __m256i) -> __m256i {
        match D {
            0 => _mm256_dpbusd_epi32(sum, u, q),
            _ => _mm256_dpbusd_avx_epi32(sum, u, q),
        }
    }

    /// Each 4-byte run of a group block holds one column's 4 signed bytes; one broadcast run
    /// of the activations meets all 8 columns. With AVX2, `|w|` meets `q` with `w`'s sign
    /// (ggml's trick, as [`Dot::Avx2`]); with VNNI, `w + 128` meets `q` in one `vpdpbusd` and
    /// `128·Σq` comes out of the sum after. Either way the block's integer sums are exact, so
    /// every dot product gives the same bits.
    #[inline(always)]
    unsafe fn interleaved_q8_rows<const D: u8, const R: usize>(
        w: &[u8],
        qx: &[QBlock],
        blocks: usize,
        r0: usize,
        tile: &mut [f32],
    ) {
        use super::{GROUP, Q8_0};
        const GROUP_BLOCK: usize = GROUP * <Q8_0 as Format>::BYTES;
        assert!(w.len() >= blocks * GROUP_BLOCK && qx.len() >= (r0 + R) * blocks);
        assert!(tile.len() >= (r0 + R) * GROUP);
        let ones = _mm256_set1_epi16(1);
        let shift = _mm256_set1_epi8(-128);
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..blocks {
            let block = w.as_ptr().add(b * GROUP_BLOCK);
            let d = _mm256_cvtph_ps(_mm_loadu_si128(block as *const __m128i));
            let mut sums = [_mm256_setzero_si256(); R];
            for j in 0..BLOCK / 4 {
                let run = _mm256_loadu_si256(block.add(16 + 32 * j) as *const __m256i);
                if D == 2 {
                    let magnitude = _mm256_sign_epi8(run, run);
                    for (i, sum) in sums.iter_mut().enumerate() {
                        let x = broadcast_run(qx.as_ptr().add((r0 + i) * blocks + b), j);
                        let pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(x, run));
                        *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(pairs, ones));
                    }
                } else {
                    let u = _mm256_xor_si256(run, shift);
                    for (i, sum) in sums.iter_mut().enumerate() {
                        let x = broadcast_run(qx.as_ptr().add((r0 + i) * blocks + b), j);
                        *sum = dot_add::<D>(*sum, u, x);
                    }
                }
            }
            for (i, a) in acc.iter_mut().enumerate() {
                let q = &*qx.as_ptr().add((r0 + i) * blocks + b);
                let isum = if D == 2 {
                    sums[i]
                } else {
                    _mm256_sub_epi32(sums[i], _mm256_set1_epi32(128 * q.sum))
                };
                let scale = _mm256_mul_ps(d, _mm256_set1_ps(q.dx));
                *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, *a);
            }
        }
        for (i, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(tile.as_mut_ptr().add((r0 + i) * GROUP), *a);
        }
    }

    /// Q4_0 (`MIN = false`) and Q4_1 (`MIN = true`) group blocks. Each 4-byte run holds 8
    /// nibble pairs: the low nibbles meet the activations' run `j` (elements `4j..`), the high
    /// ones their run `4 + j` (elements `16 + 4j..`). With AVX2 the products of a block add up
    /// in 16-bit lanes, which they cannot overflow: `u ≤ 15` and `|qx| ≤ 127` give at most
    /// 8·2·15·127 = 30 480 per lane; with VNNI they add up in 32-bit lanes. Both sums are
    /// exact. Q4_0's `u − 8` comes out of the integer sum as `8·Σqx`; Q4_1's min adds
    /// `m·(dx·Σqx)`.
    #[inline(always)]
    unsafe fn interleaved_q4_rows<const MIN: bool, const D: u8, const R: usize>(
        w: &[u8],
        qx: &[QBlock],
        blocks: usize,
        r0: usize,
        tile: &mut [f32],
    ) {
        use super::{Packing, GROUP};
        let packing = if MIN { Packing::Q4_1 } else { Packing::Q4_0 };
        let group_block = GROUP * packing.block_bytes();
        let header = packing.header();
        assert!(w.len() >= blocks * group_block && qx.len() >= (r0 + R) * blocks);
        assert!(tile.len() >= (r0 + R) * GROUP);
        let ones = _mm256_set1_epi16(1);
        let low = _mm256_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..blocks {
            let block = w.as_ptr().add(b * group_block);
            let d = _mm256_cvtph_ps(_mm_loadu_si128(block as *const __m128i));
            let mut sums = [_mm256_setzero_si256(); R];
            for j in 0..4 {
                let run = _mm256_loadu_si256(block.add(header + 32 * j) as *const __m256i);
                let lo = _mm256_and_si256(run, low);
                let hi = _mm256_and_si256(_mm256_srli_epi16(run, 4), low);
                for (i, sum) in sums.iter_mut().enumerate() {
                    let q = qx.as_ptr().add((r0 + i) * blocks + b);
                    if D == 2 {
                        let pairs = _mm256_add_epi16(
                            _mm256_maddubs_epi16(lo, broadcast_run(q, j)),
                            _mm256_maddubs_epi16(hi, broadcast_run(q, 4 + j)),
                        );
                        *sum = _mm256_add_epi16(*sum, pairs);
                    } else {
                        *sum = dot_add::<D>(*sum, lo, broadcast_run(q, j));
                        *sum = dot_add::<D>(*sum, hi, broadcast_run(q, 4 + j));
                    }
                }
            }
            let m = if MIN {
                _mm256_cvtph_ps(_mm_loadu_si128(block.add(16) as *const __m128i))
            } else {
                _mm256_setzero_ps()
            };
            for (i, a) in acc.iter_mut().enumerate() {
                let q = &*qx.as_ptr().add((r0 + i) * blocks + b);
                let mut isum = if D == 2 {
                    _mm256_madd_epi16(sums[i], ones)
                } else {
                    sums[i]
                };
                if !MIN {
                    isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(8 * q.sum));
                }
                let scale = _mm256_mul_ps(d, _mm256_set1_ps(q.dx));
                *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, *a);
                if MIN {
                    *a = _mm256_fmadd_ps(m, _mm256_set1_ps(q.s), *a);
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(tile.as_mut_ptr().add((r0 + i) * GROUP), *a);
        }
    }

    /// The best dot product this CPU runs, if any.
    pub fn best() -> Option<Dot> {
        [Dot::Vnni512, Dot::AvxVnni, Dot::Avx2]
            .into_iter()
            .find(|dot| dot.available())
    }

    impl Dot {
        /// Whether this CPU has every feature the dot product's passes are compiled for.
        pub fn available(self) -> bool {
            use std::arch::is_x86_feature_detected as has;
            has!("avx2")
                && has!("fma")
                && has!("f16c")
                && match self {
                    Dot::Vnni512 => {
                        has!("avx512f")
                            && has!("avx512bw")
                            && has!("avx512vl")
                            && has!("avx512vnni")
                    }
                    Dot::AvxVnni => has!("avxvnni"),
                    Dot::Avx2 => true,
                }
        }
    }
}

type Pass = fn(&[u8], usize, &[QBlock], usize, usize, &mut [f32]);

/// The pass for format `F` on this CPU.
fn pass<F: Format>() -> Pass {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY (each closure): `best` found every feature the pass is compiled for.
        match x86::best() {
            Some(x86::Dot::Vnni512) => {
                return |w, rb, q, r, c, o| unsafe { x86::vnni512::<F>(w, rb, q, r, c, o) }
            }
            Some(x86::Dot::AvxVnni) => {
                return |w, rb, q, r, c, o| unsafe { x86::avx_vnni::<F>(w, rb, q, r, c, o) }
            }
            Some(x86::Dot::Avx2) => {
                return |w, rb, q, r, c, o| unsafe { x86::avx2::<F>(w, rb, q, r, c, o) }
            }
            None => {}
        }
    }
    columns_scalar::<F>
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

/// Columns of a group of [`Interleaved`] weights.
pub const GROUP: usize = 8;

/// The types [`Interleaved`] repacks, and where their parts lie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packing {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl Packing {
    pub fn of(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            _ => None,
        }
    }

    pub fn dtype(self) -> GgmlDType {
        match self {
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q8_0 => GgmlDType::Q8_0,
        }
    }

    /// Bytes of one checkpoint block.
    const fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => Q4_0::BYTES,
            Self::Q4_1 => Q4_1::BYTES,
            Self::Q8_0 => Q8_0::BYTES,
        }
    }

    /// Where a checkpoint block's quants start: after its f16 scale, and min for Q4_1.
    const fn quants_at(self) -> usize {
        match self {
            Self::Q4_1 => 4,
            _ => 2,
        }
    }

    /// Bytes of a group block before its quants: 8 scales, and 8 mins for Q4_1.
    const fn header(self) -> usize {
        self.quants_at() * GROUP
    }
}

/// Q8_0, Q4_0 or Q4_1 weights `[n, k]` repacked for decoding, as ggml repacks its weights for
/// the CPU: the columns (weight rows) in groups of [`GROUP`] (the last one padded), each
/// group's blocks in turn, and in each group block the 8 columns' f16 scales (then their 8
/// f16 mins for Q4_1), then the quant bytes of every column in runs of 4 interleaved column by
/// column (run `j` of column `c` at `header + 32·j + 4·c`: 8 runs of Q8_0's bytes, 4 of the
/// 4-bit types' nibble pairs, whose low nibbles are elements `4j..` and high ones `16 + 4j..`).
/// One broadcast 4-byte run of the activations meets all 8 columns in one register, the 8
/// scales convert in one instruction, and a row's 8 sums need no horizontal reduction: about
/// half the instructions per weight block of the row-major kernel, which is bound by its
/// arithmetic, not by memory. The bytes meet in one VNNI `vpdpbusd` per run and row where
/// the CPU has AVX-512 VNNI or AVX-VNNI, in AVX2 `vpmaddubsw` otherwise (chosen at packing).
/// The checkpoint's bytes in another order ([`Self::unpack`]).
///
/// Each output is a sum over the blocks in order of `(d·dx)·Σ(u·qx)` with the integer sums
/// exact (Q4_0's `u − 8` folded into them), plus `m·(dx·Σqx)` for Q4_1, so a row has the same
/// bits in any tile and any call, and a column the same bits in any group.
#[derive(Debug, Clone)]
pub struct Interleaved {
    bytes: Vec<u8>,
    packing: Packing,
    n: usize,
    k: usize,
    /// The group kernel, with the best dot product this CPU has.
    group: GroupKernel,
}

impl Interleaved {
    /// Repacks the bytes of a Q8_0, Q4_0 or Q4_1 `[n, k]` weight; `None` for another type,
    /// unless `k` is a multiple of [`BLOCK`], or where this CPU lacks the interleaved kernel.
    pub fn pack(weight: &[u8], dtype: GgmlDType, n: usize, k: usize) -> Option<Self> {
        let packing = Packing::of(dtype)?;
        let group = group_kernel(packing)?;
        if n == 0 || !k.is_multiple_of(BLOCK) {
            return None;
        }
        let bytes = packing.block_bytes();
        let row_bytes = k / BLOCK * bytes;
        if weight.len() != n * row_bytes {
            return None;
        }
        let (at, header) = (packing.quants_at(), packing.header());
        let mut out = vec![0u8; n.div_ceil(GROUP) * GROUP * row_bytes];
        for (g, group) in out.chunks_exact_mut(GROUP * row_bytes).enumerate() {
            for (b, packed) in group.chunks_exact_mut(GROUP * bytes).enumerate() {
                // Padding columns keep zero scales, mins and quants.
                for c in 0..GROUP.min(n - g * GROUP) {
                    let src = (g * GROUP + c) * row_bytes + b * bytes;
                    let block = &weight[src..src + bytes];
                    for h in 0..at / 2 {
                        packed[2 * (GROUP * h + c)..][..2].copy_from_slice(&block[2 * h..][..2]);
                    }
                    for j in 0..(bytes - at) / 4 {
                        packed[header + 4 * (GROUP * j + c)..][..4]
                            .copy_from_slice(&block[at + 4 * j..][..4]);
                    }
                }
            }
        }
        Some(Self {
            bytes: out,
            packing,
            n,
            k,
            group,
        })
    }

    /// The checkpoint's row-major bytes again.
    pub fn unpack(&self) -> Vec<u8> {
        let bytes = self.packing.block_bytes();
        let (at, header) = (self.packing.quants_at(), self.packing.header());
        let row_bytes = self.k / BLOCK * bytes;
        let mut weight = vec![0u8; self.n * row_bytes];
        for (g, group) in self.bytes.chunks_exact(GROUP * row_bytes).enumerate() {
            for (b, packed) in group.chunks_exact(GROUP * bytes).enumerate() {
                for c in 0..GROUP.min(self.n - g * GROUP) {
                    let dst = (g * GROUP + c) * row_bytes + b * bytes;
                    let block = &mut weight[dst..dst + bytes];
                    for h in 0..at / 2 {
                        block[2 * h..][..2].copy_from_slice(&packed[2 * (GROUP * h + c)..][..2]);
                    }
                    for j in 0..(bytes - at) / 4 {
                        block[at + 4 * j..][..4]
                            .copy_from_slice(&packed[header + 4 * (GROUP * j + c)..][..4]);
                    }
                }
            }
        }
        weight
    }

    /// The weight of the first `n` columns only: a prefix of the groups, as they are.
    pub fn first_rows(&self, n: usize) -> Option<Self> {
        if n == 0 || n > self.n {
            return None;
        }
        Some(Self {
            bytes: self.bytes[..n.div_ceil(GROUP) * self.group_bytes()].to_vec(),
            n,
            ..*self
        })
    }

    /// `[n, k]`.
    pub fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// The checkpoint's type.
    pub fn dtype(&self) -> GgmlDType {
        self.packing.dtype()
    }

    fn group_bytes(&self) -> usize {
        self.k / BLOCK * GROUP * self.packing.block_bytes()
    }

    /// `out[m, n] = x[m, k] · Wᵀ`.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let (n, k) = (self.n, self.k);
        assert_eq!(x.len(), m * k);
        assert_eq!(out.len(), m * n);
        let blocks = k / BLOCK;
        let group_bytes = self.group_bytes();
        let groups = n.div_ceil(GROUP);
        for r0 in (0..m).step_by(ROWS) {
            let rows = (m - r0).min(ROWS);
            // Row-major activations: row r's blocks together.
            let qx: Vec<QBlock> = x[r0 * k..(r0 + rows) * k]
                .chunks_exact(BLOCK)
                .map(quantize_block)
                .collect();
            // Group-major: every group's `rows × 8` sums together, copied into `out` after.
            let mut sums = vec![0f32; groups * GROUP * rows];
            sums.par_chunks_mut(COLUMNS_PER_TASK * rows)
                .enumerate()
                .for_each(|(task, chunk)| {
                    let g0 = task * COLUMNS_PER_TASK / GROUP;
                    for (i, tile) in chunk.chunks_exact_mut(GROUP * rows).enumerate() {
                        let g = g0 + i;
                        let w = &self.bytes[g * group_bytes..(g + 1) * group_bytes];
                        self.group(w, &qx, blocks, rows, tile);
                    }
                });
            for (g, tile) in sums.chunks_exact(GROUP * rows).enumerate() {
                let width = GROUP.min(n - g * GROUP);
                for (r, row) in tile.chunks_exact(GROUP).enumerate() {
                    out[(r0 + r) * n + g * GROUP..][..width].copy_from_slice(&row[..width]);
                }
            }
        }
    }
}

impl Interleaved {
    /// One group's `rows × 8` sums, row by row, into `tile`.
    fn group(&self, w: &[u8], qx: &[QBlock], blocks: usize, rows: usize, tile: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `pack` chose the kernel with `x86::best`, which found its CPU features;
        // `w` is one group's blocks of this packing, `qx` `rows × blocks` blocks, `tile`
        // `rows × 8` sums.
        unsafe {
            (self.group)(w, qx, blocks, rows, tile)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (w, qx, blocks, rows, tile);
            match self.group {}
        }
    }
}

/// The kernel of a group of [`Interleaved`] weights, on x86-64 with AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
type GroupKernel = x86::Group;
/// Elsewhere there is none, and no weights are interleaved.
#[cfg(not(target_arch = "x86_64"))]
type GroupKernel = std::convert::Infallible;

/// The group kernel for `packing` with the best dot product this CPU has, if it has one.
fn group_kernel(packing: Packing) -> Option<GroupKernel> {
    #[cfg(target_arch = "x86_64")]
    {
        Some(x86::group(packing, x86::best()?))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = packing;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every pass this CPU has (the best one, AVX2 and plain Rust) gives the same sums.
    /// The shift rounds as `round_ties_even` over the activations' range, ties included.
    #[test]
    fn round_even_rounds_ties_to_even() {
        for i in -2600..=2600 {
            let x = i as f32 * 0.05;
            assert_eq!(round_even(x), x.round_ties_even(), "{x}");
            let y = x + 0.5f32.copysign(x);
            assert_eq!(round_even(y), y.round_ties_even(), "{y}");
        }
    }

    #[test]
    fn every_pass_agrees_with_plain_arithmetic() {
        let (n, k, rows) = (5, 96, 3);
        let blocks = k / BLOCK;
        let mut seed = 7u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (seed >> 16) as u8
        };
        let qx: Vec<QBlock> = (0..blocks * rows)
            .map(|_| {
                let mut q = QBlock {
                    qx: [0; BLOCK],
                    dx: 0.01,
                    sum: 0,
                    s: 0.0,
                };
                for v in q.qx.iter_mut() {
                    *v = (next() as i8).max(-127);
                    q.sum += i32::from(*v);
                }
                q.s = q.dx * q.sum as f32;
                q
            })
            .collect();
        fn check<F: Format>(weight: &[u8], n: usize, blocks: usize, qx: &[QBlock], rows: usize) {
            let row_bytes = blocks * F::BYTES;
            let mut want = vec![0f32; n * rows];
            columns_scalar::<F>(weight, row_bytes, qx, rows, 0, &mut want);
            let mut got = vec![0f32; n * rows];
            pass::<F>()(weight, row_bytes, qx, rows, 0, &mut got);
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
            }
            #[cfg(target_arch = "x86_64")]
            if x86::best().is_some() {
                let mut avx2 = vec![0f32; n * rows];
                // SAFETY: `best` found AVX2, FMA and F16C.
                unsafe { x86::avx2::<F>(weight, row_bytes, qx, rows, 0, &mut avx2) };
                for (a, b) in avx2.iter().zip(&want) {
                    assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
                }
            }
        }
        let mut weight = |bytes: usize| -> Vec<u8> {
            let mut w: Vec<u8> = (0..n * blocks * bytes).map(|_| next()).collect();
            // Finite f16 scales (and mins): 0x3C00 = 1.0, 0x3800 = 0.5.
            for block in w.chunks_mut(bytes) {
                block[..4].copy_from_slice(&[0x00, 0x3C, 0x00, 0x38]);
            }
            w
        };
        check::<Q4_0>(&weight(18), n, blocks, &qx, rows);
        check::<Q4_1>(&weight(20), n, blocks, &qx, rows);
        check::<Q5_0>(&weight(22), n, blocks, &qx, rows);
        check::<Q5_1>(&weight(24), n, blocks, &qx, rows);
        check::<Q8_0>(&weight(34), n, blocks, &qx, rows);
    }

    /// Interleaved Q8_0, Q4_0 and Q4_1 weights: the layout round-trips (a padded last group
    /// included), the products agree with the plain arithmetic of the row-major bytes, every
    /// row has the bits it has alone (1 to 67 rows, across the 64-row tiles), a prefix of the
    /// columns has the bits of the whole, and every dot product the CPU has (VNNI, AVX2) gives
    /// the same bits. Weights are interleaved on x86-64 only.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn interleaved_weights_round_trip_and_keep_every_rows_bits() {
        if Interleaved::pack(&[0; 34], GgmlDType::Q8_0, 1, 32).is_none() {
            return;
        }
        fn check<F: Format>(dtype: GgmlDType) {
            let (n, k) = (21usize, 96usize);
            let blocks = k / BLOCK;
            let mut seed = 11u32;
            let mut next = || {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (seed >> 16) as u8
            };
            let mut weight: Vec<u8> = (0..n * blocks * F::BYTES).map(|_| next()).collect();
            for (i, block) in weight.chunks_mut(F::BYTES).enumerate() {
                // Finite f16 scales between 0.5 and 1, and mins between -1 and -0.5.
                block[..2].copy_from_slice(&(0x3800u16 + (i as u16 % 1024)).to_le_bytes());
                if F::has_min() {
                    block[2..4].copy_from_slice(&(0xB800u16 + (i as u16 % 997)).to_le_bytes());
                }
            }
            let packed = Interleaved::pack(&weight, dtype, n, k).unwrap();
            assert_eq!(packed.dtype(), dtype);
            assert_eq!(packed.unpack(), weight, "{dtype:?}");
            let prefix = packed.first_rows(13).unwrap();
            assert_eq!(prefix.unpack(), weight[..13 * blocks * F::BYTES]);
            let m = 67;
            let x: Vec<f32> = (0..m * k).map(|_| f32::from(next()) / 64.0 - 2.0).collect();
            let mut all = vec![0f32; m * n];
            packed.matmul(&x, m, &mut all);
            let mut first = vec![0f32; m * 13];
            prefix.matmul(&x, m, &mut first);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            // Every dot product this CPU has gives the bits of the best one.
            #[cfg(target_arch = "x86_64")]
            for dot in [x86::Dot::Vnni512, x86::Dot::AvxVnni, x86::Dot::Avx2] {
                if dot.available() {
                    let mut other = packed.clone();
                    other.group = x86::group(Packing::of(dtype).unwrap(), dot);
                    let mut got = vec![0f32; m * n];
                    other.matmul(&x, m, &mut got);
                    assert_eq!(bits(&got), bits(&all), "{dtype:?} {dot:?}");
                }
            }
            for r in 0..m {
                let row = &x[r * k..(r + 1) * k];
                let mut alone = vec![0f32; n];
                packed.matmul(row, 1, &mut alone);
                let got = &all[r * n..(r + 1) * n];
                assert_eq!(bits(got), bits(&alone), "{dtype:?} row {r} of {m}");
                assert_eq!(
                    bits(&first[r * 13..(r + 1) * 13]),
                    bits(&got[..13]),
                    "{dtype:?} row {r}"
                );
                let qx: Vec<QBlock> = row.chunks_exact(BLOCK).map(quantize_block).collect();
                let mut want = vec![0f32; n];
                columns_scalar::<F>(&weight, blocks * F::BYTES, &qx, 1, 0, &mut want);
                for (a, b) in got.iter().zip(&want) {
                    assert!(
                        (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                        "{dtype:?} row {r}: {a} vs {b}"
                    );
                }
            }
            assert!(Interleaved::pack(&weight, dtype, n, k + 1).is_none());
            assert!(Interleaved::pack(&weight[1..], dtype, n, k).is_none());
        }
        check::<Q8_0>(GgmlDType::Q8_0);
        check::<Q4_0>(GgmlDType::Q4_0);
        check::<Q4_1>(GgmlDType::Q4_1);
        assert!(Interleaved::pack(&[0; 22], GgmlDType::Q5_0, 1, 32).is_none());
    }
}
