//! Attention of a few queries at inference (decoding one token, verifying a chain or a tree of
//! drafted tokens) on the CPU, one query row at a time, reading the cached keys and values in
//! place.
//!
//! Each row's output is a function of that row's query and of the keys and values it sees, in
//! order, and of nothing else: not of how many queries share the call, nor of the keys its mask
//! hides, nor of the instruction set. That is what makes speculative decoding exact: a drafted
//! token verified in a chain or a tree, among siblings it does not see, gets the bits it gets
//! when decoded alone. (A GEMM's summation order depends on the number of rows, and a softmax
//! over a masked row on how many hidden keys pad it; the 8-bit activations of a quantized model
//! turn such a last-bit difference into a different token.)
//!
//! For query `q` over its visible keys `k₁ … kₙ` (in cache order):
//! `sⱼ = scale · q·kⱼ` (a 16-lane dot product, lanes summed pairwise), `m = maxⱼ sⱼ`,
//! `pⱼ = exp(sⱼ − m)`, `ℓ = Σⱼ pⱼ` (16 lanes by visible index), and `o = (Σⱼ pⱼ vⱼ) / ℓ`
//! accumulated over `j` in order. A row that sees no key attends uniformly to every key, as the
//! other backends do.

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

use super::fast_math::exp_poly;
use super::fused_attention::{KeyVisibility, Mask, MAX_HEAD_DIM};

/// Up to this many queries per call, the decode kernel takes causal and padding masks; a draft
/// tree takes it at any size (its exactness is what verification needs).
pub const DECODE_MAX_QUERIES: usize = 64;

const LANES: usize = 16;

/// Whether [`decode_attention`] takes these inputs: CPU f32 tensors outside any training
/// graph, head width ≤ [`MAX_HEAD_DIM`], each head's rows contiguous.
pub(crate) fn decode_attention_fits(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    let inference = !(q.track_op() || k.track_op() || v.track_op());
    let f32 = [q, k, v].iter().all(|t| t.dtype() == DType::F32);
    let rows_contiguous = [q, k, v]
        .iter()
        .all(|t| t.rank() == 4 && t.layout().stride()[3] == 1);
    inference
        && f32
        && rows_contiguous
        && q.device().is_cpu()
        && q.dim(3).is_ok_and(|d| d <= MAX_HEAD_DIM)
}

/// A `[B, H, L, d]` f32 tensor's data and its element strides.
struct View<'a> {
    data: &'a [f32],
    start: usize,
    stride: [usize; 3],
}

impl<'a> View<'a> {
    fn new(storage: &'a Storage, layout: &Layout, what: &str) -> Result<Self> {
        let Storage::Cpu(CpuStorage::F32(data)) = storage else {
            candle_core::bail!("decode attention takes f32 CPU tensors for {what}");
        };
        let s = layout.stride();
        Ok(Self {
            data,
            start: layout.start_offset(),
            stride: [s[0], s[1], s[2]],
        })
    }

    #[inline(always)]
    fn row(&self, b: usize, h: usize, i: usize, d: usize) -> &'a [f32] {
        let at = self.start + b * self.stride[0] + h * self.stride[1] + i * self.stride[2];
        &self.data[at..at + d]
    }
}

/// The keys and values of one key/value head.
struct KeyValues<'a> {
    k: &'a View<'a>,
    v: &'a View<'a>,
    b: usize,
    head: usize,
    d: usize,
}

impl KeyValues<'_> {
    #[inline(always)]
    fn key(&self, j: usize) -> &[f32] {
        self.k.row(self.b, self.head, j, self.d)
    }

    #[inline(always)]
    fn value(&self, j: usize) -> &[f32] {
        self.v.row(self.b, self.head, j, self.d)
    }
}

/// `Σ a·b` in 16 lanes (lane `c mod 16` takes channel `c`), the lanes summed pairwise.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        acc[l] += x * y;
    }
    sum_lanes(acc)
}

/// [`dot`] in two AVX registers (lanes 0..8 and 8..16): the same products, additions and
/// order, so the same bits.
///
/// # Safety
/// The CPU has AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
unsafe fn dot_avx(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let full = n / LANES;
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for c in 0..full {
        // SAFETY: chunk `c` of 16 lies inside both slices.
        unsafe {
            let (x, y) = (pa.add(c * LANES), pb.add(c * LANES));
            lo = _mm256_add_ps(lo, _mm256_mul_ps(_mm256_loadu_ps(x), _mm256_loadu_ps(y)));
            hi = _mm256_add_ps(
                hi,
                _mm256_mul_ps(_mm256_loadu_ps(x.add(8)), _mm256_loadu_ps(y.add(8))),
            );
        }
    }
    let mut acc = [0f32; LANES];
    // SAFETY: `acc` holds 16 floats.
    unsafe {
        _mm256_storeu_ps(acc.as_mut_ptr(), lo);
        _mm256_storeu_ps(acc.as_mut_ptr().add(8), hi);
    }
    for (l, (x, y)) in a[full * LANES..n]
        .iter()
        .zip(&b[full * LANES..n])
        .enumerate()
    {
        acc[l] += x * y;
    }
    sum_lanes(acc)
}

#[inline(always)]
fn sum_lanes(mut acc: [f32; LANES]) -> f32 {
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            acc[l] += acc[l + width];
        }
    }
    acc[0]
}

/// One query row: `out = softmax(scale · q Kᵀ) V` over the keys `visible` lists, or with equal
/// weights over them when `uniform` (a row that sees no key lists every key). `scores` is
/// scratch of at least as many keys.
///
/// `AVX`: the dot products by [`dot_avx`] (the caller runs on a CPU with AVX).
#[inline(always)]
fn row_generic<const AVX: bool>(
    q: &[f32],
    kv: &KeyValues,
    (visible, uniform): (&[usize], bool),
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    out.fill(0.0);
    if visible.is_empty() {
        return;
    }
    let scores = &mut scores[..visible.len()];
    if uniform {
        scores.fill(1.0);
    } else {
        let mut max = f32::NEG_INFINITY;
        for (s, &j) in scores.iter_mut().zip(visible) {
            let key = kv.key(j);
            #[cfg(target_arch = "x86_64")]
            let qk = if AVX {
                // SAFETY: the caller runs on a CPU with AVX.
                unsafe { dot_avx(q, key) }
            } else {
                dot(q, key)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let qk = dot(q, key);
            *s = qk * scale;
            max = if *s > max { *s } else { max };
        }
        scores.iter_mut().for_each(|s| *s = exp_poly(*s - max));
    }
    let mut lanes = [0f32; LANES];
    for (n, s) in scores.iter().enumerate() {
        lanes[n % LANES] += *s;
    }
    let inv = 1.0 / sum_lanes(lanes);
    for (&p, &j) in scores.iter().zip(visible) {
        for (o, &x) in out.iter_mut().zip(kv.value(j)) {
            *o += p * x;
        }
    }
    out.iter_mut().for_each(|o| *o *= inv);
}

/// [`row_generic`] in AVX-512 registers, with the same products, additions and order, so the
/// same bits: the scores of four keys at a time (four independent sums, each lane `l` over
/// channels `l mod 16` in order, then the lanes by [`super::dense_rows::reduce512`], the order
/// of [`sum_lanes`]), and the weighted values into four 16-channel sums at a time kept in
/// registers over the keys, in key order. Lanes past the head width load as zeros.
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn row_avx512(
    q: &[f32],
    kv: &KeyValues,
    (visible, uniform): (&[usize], bool),
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    use super::dense_rows::reduce512;
    use std::arch::x86_64::*;
    out.fill(0.0);
    if visible.is_empty() {
        return;
    }
    let d = kv.d;
    let chunks = d.div_ceil(LANES);
    let mask = |c: usize| -> __mmask16 {
        let lanes = (d - c * LANES).min(LANES);
        ((1u32 << lanes) - 1) as u16
    };
    let scores = &mut scores[..visible.len()];
    if uniform {
        scores.fill(1.0);
    } else {
        let mut max = f32::NEG_INFINITY;
        for (group, keys) in scores.chunks_mut(4).zip(visible.chunks(4)) {
            let kp: [*const f32; 4] =
                std::array::from_fn(|t| kv.key(keys[t.min(keys.len() - 1)]).as_ptr());
            let mut acc = [_mm512_setzero_ps(); 4];
            for c in 0..chunks {
                let m = mask(c);
                // SAFETY: chunk `c`'s first `d - 16c` lanes lie inside the query and key rows,
                // and the mask loads no others.
                let qc = unsafe { _mm512_maskz_loadu_ps(m, q.as_ptr().add(c * LANES)) };
                for t in 0..4 {
                    let kc = unsafe { _mm512_maskz_loadu_ps(m, kp[t].add(c * LANES)) };
                    acc[t] = _mm512_add_ps(acc[t], _mm512_mul_ps(qc, kc));
                }
            }
            for (s, acc) in group.iter_mut().zip(acc) {
                // SAFETY: the CPU has AVX-512F.
                *s = unsafe { reduce512(acc) } * scale;
                max = if *s > max { *s } else { max };
            }
        }
        scores.iter_mut().for_each(|s| *s = exp_poly(*s - max));
    }
    let mut lanes = _mm512_setzero_ps();
    for part in scores.chunks(LANES) {
        let m = ((1u32 << part.len()) - 1) as u16;
        // SAFETY: the mask loads the part's own floats only.
        lanes = _mm512_add_ps(lanes, unsafe { _mm512_maskz_loadu_ps(m, part.as_ptr()) });
    }
    // SAFETY: the CPU has AVX-512F.
    let inv = _mm512_set1_ps(1.0 / unsafe { reduce512(lanes) });
    for c0 in (0..chunks).step_by(4) {
        let width = 4.min(chunks - c0);
        let mut acc = [_mm512_setzero_ps(); 4];
        for (&p, &j) in scores.iter().zip(visible) {
            let (p, value) = (_mm512_set1_ps(p), kv.value(j).as_ptr());
            for (t, acc) in acc.iter_mut().enumerate().take(width) {
                let c = c0 + t;
                // SAFETY: as for the keys, in the value row.
                let vc = unsafe { _mm512_maskz_loadu_ps(mask(c), value.add(c * LANES)) };
                *acc = _mm512_add_ps(*acc, _mm512_mul_ps(p, vc));
            }
        }
        for (t, acc) in acc.iter().enumerate().take(width) {
            let c = c0 + t;
            // SAFETY: the mask stores inside `out`, which holds `d` floats.
            unsafe {
                _mm512_mask_storeu_ps(
                    out.as_mut_ptr().add(c * LANES),
                    mask(c),
                    _mm512_mul_ps(*acc, inv),
                )
            };
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn row_avx2(
    q: &[f32],
    kv: &KeyValues,
    visible: (&[usize], bool),
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    row_generic::<true>(q, kv, visible, scale, scores, out)
}

/// [`row_generic`] with the widest vectors the CPU has; every path computes the same bits
/// (the summation order is written out, and no multiply-add is fused).
fn row(
    q: &[f32],
    kv: &KeyValues,
    visible: (&[usize], bool),
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the feature the function was compiled for.
            return unsafe { row_avx512(q, kv, visible, scale, scores, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above.
            return unsafe { row_avx2(q, kv, visible, scale, scores, out) };
        }
    }
    row_generic::<false>(q, kv, visible, scale, scores, out)
}

/// `softmax(q kᵀ · scale + mask) v` for q `[B, H, Lq, d]` over k and v `[B, Hkv, Lk, d]`
/// (each key/value head shared by `H / Hkv` query heads; k and v may be views of a larger
/// cache), row by row as the module doc says. Inference only (no backward): check
/// [`decode_attention_fits`] first.
pub fn decode_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    visibility: &KeyVisibility,
) -> Result<Tensor> {
    let (b, h, lq, d) = q.dims4()?;
    let (bk, hkv, lk, dk) = k.dims4()?;
    if k.dims() != v.dims() || b != bk || d != dk || hkv == 0 || h % hkv != 0 || d > MAX_HEAD_DIM {
        candle_core::bail!(
            "decode attention: q {:?}, k {:?} and v {:?} do not fit together",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let mask = Mask::new(visibility, b, lq, lk)?;
    let groups = h / hkv;
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (qv, kv, vv) = (
        View::new(&qs, ql, "q")?,
        View::new(&ks, kl, "k")?,
        View::new(&vs, vl, "v")?,
    );
    // Written as [B, Lq, H, d], which merging the heads reads in place.
    let mut out = vec![0f32; b * lq * h * d];
    let scale = scale as f32;
    out.par_chunks_mut(d).enumerate().for_each_init(
        || (Vec::with_capacity(lk), vec![0f32; lk]),
        |(visible, scores), (n, o)| {
            let (b, i, head) = (n / (lq * h), n / h % lq, n % h);
            visible.clear();
            visible.extend((0..lk).filter(|&j| mask.visible(b, i, j)));
            let blind = visible.is_empty();
            if blind {
                visible.extend(0..lk);
            }
            let pair = KeyValues {
                k: &kv,
                v: &vv,
                b,
                head: head / groups,
                d,
            };
            row(
                qv.row(b, head, i, d),
                &pair,
                (visible, blind),
                scale,
                scores,
                o,
            );
        },
    );
    drop((qs, ks, vs));
    Tensor::from_vec(out, (b, lq, h, d), q.device())?.transpose(1, 2)
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "x86_64")]
    use super::*;

    /// The AVX dot product has the plain one's bits, whole chunks of 16 or not.
    #[test]
    fn avx_dot_has_the_bits_of_the_plain_dot() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx") {
            let mut seed = 11u64;
            let mut rand = || {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            };
            for n in [1, 5, 15, 16, 17, 33, 64, 100, 128] {
                let a: Vec<f32> = (0..n).map(|_| rand()).collect();
                let b: Vec<f32> = (0..n).map(|_| rand() * 3.0).collect();
                // SAFETY: the CPU has AVX.
                let fast = unsafe { dot_avx(&a, &b) };
                assert_eq!(fast.to_bits(), dot(&a, &b).to_bits(), "length {n}");
            }
        }
    }

    /// The AVX-512 row has the plain row's bits: head widths inside, at and across chunks of
    /// 16, key counts around the groups of four, every key or some, uniform or not.
    #[test]
    fn avx512_row_has_the_bits_of_the_plain_row() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            let mut seed = 5u64;
            let mut rand = || {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            };
            for d in [1, 15, 16, 17, 64, 80, 100, 128, 256] {
                for keys in [1, 3, 4, 5, 17, 70] {
                    let kd: Vec<f32> = (0..keys * d).map(|_| rand() * 4.0).collect();
                    let vd: Vec<f32> = (0..keys * d).map(|_| rand()).collect();
                    let q: Vec<f32> = (0..d).map(|_| rand() * 4.0).collect();
                    let k =
                        Tensor::from_vec(kd, (1, 1, keys, d), &candle_core::Device::Cpu).unwrap();
                    let v =
                        Tensor::from_vec(vd, (1, 1, keys, d), &candle_core::Device::Cpu).unwrap();
                    let (ks, kl) = k.storage_and_layout();
                    let (vs, vl) = v.storage_and_layout();
                    let (kview, vview) = (
                        View::new(&ks, kl, "k").unwrap(),
                        View::new(&vs, vl, "v").unwrap(),
                    );
                    let pair = KeyValues {
                        k: &kview,
                        v: &vview,
                        b: 0,
                        head: 0,
                        d,
                    };
                    let every: Vec<usize> = (0..keys).collect();
                    let some: Vec<usize> = (0..keys).filter(|j| j % 3 != 1).collect();
                    for (visible, uniform) in [(&every, false), (&some, false), (&every, true)] {
                        let mut scratch = vec![0f32; keys];
                        let (mut plain, mut fast) = (vec![0f32; d], vec![0f32; d]);
                        let seen = (visible.as_slice(), uniform);
                        row_generic::<false>(&q, &pair, seen, 0.125, &mut scratch, &mut plain);
                        // SAFETY: the CPU has AVX-512F.
                        unsafe { row_avx512(&q, &pair, seen, 0.125, &mut scratch, &mut fast) };
                        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&fast), bits(&plain), "d {d}, {keys} keys");
                    }
                }
            }
        }
    }
}
