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

/// One query row of a tile: its query, the keys it sees (in order), and whether it attends
/// uniformly to them (it sees no key, and they are every key).
#[cfg(target_arch = "x86_64")]
struct TileRow<'a> {
    q: &'a [f32],
    keys: &'a [usize],
    uniform: bool,
}

/// Up to four rows that share a key/value head, each with [`row_generic`]'s products,
/// additions and order, so its bits, in AVX-512 registers. The keys that every row sees first
/// (the cache, before a chain's or a tree's own tokens) are loaded once for all the rows: the
/// scores of four keys at a time (each lane `l` over channels `l mod 16` in order, then the
/// lanes by [`super::dense_rows::reduce512`], the order of [`sum_lanes`]), and the weighted
/// values into 16-channel sums held in registers over the keys, in key order. Each row's own
/// keys follow alone, continuing its sums. Lanes past the head width load as zeros. `scores`
/// holds a scratch vector per row; `out` the rows' outputs, `d` apart.
///
/// # Safety
/// The CPU has AVX-512F; every row has `d` channels.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512(
    rows: &[TileRow],
    kv: &KeyValues,
    scale: f32,
    scores: &mut [Vec<f32>],
    out: &mut [f32],
) {
    use super::dense_rows::reduce512;
    use std::arch::x86_64::*;
    let d = kv.d;
    let mut masks = [0 as __mmask16; MAX_HEAD_DIM / LANES];
    for (c, m) in masks.iter_mut().enumerate().take(d.div_ceil(LANES)) {
        *m = ((1u32 << (d - c * LANES).min(LANES)) - 1) as u16;
    }
    let masks = &masks[..d.div_ceil(LANES)];
    // The keys every row sees first, and whether their scores can be shared.
    let first = rows[0].keys;
    let shared = rows.iter().skip(1).fold(first.len(), |n, row| {
        n.min(
            first
                .iter()
                .zip(row.keys)
                .take_while(|(a, b)| a == b)
                .count(),
        )
    });
    let joint_scores = rows.len() > 1 && rows.iter().all(|row| !row.uniform);
    out.fill(0.0);
    let mut inv = [0f32; 4];
    for (r, row) in rows.iter().enumerate() {
        let s = &mut scores[r];
        s.clear();
        s.resize(row.keys.len(), 1.0);
    }
    if joint_scores && shared > 0 {
        let q: [*const f32; 4] = std::array::from_fn(|r| rows[r.min(rows.len() - 1)].q.as_ptr());
        let s: [*mut f32; 4] = std::array::from_fn(|r| scores[r.min(rows.len() - 1)].as_mut_ptr());
        match rows.len() {
            2 => score_rows::<2>(q, kv, &first[..shared], scale, s, masks),
            3 => score_rows::<3>(q, kv, &first[..shared], scale, s, masks),
            _ => score_rows::<4>(q, kv, &first[..shared], scale, s, masks),
        }
    }
    let from = if joint_scores { shared } else { 0 };
    for (r, row) in rows.iter().enumerate() {
        let s = &mut scores[r];
        if !row.uniform {
            let (q, p) = ([row.q.as_ptr(); 4], [s.as_mut_ptr().add(from); 4]);
            score_rows::<1>(q, kv, &row.keys[from..], scale, p, masks);
            let max = s
                .iter()
                .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
            s.iter_mut().for_each(|x| *x = exp_poly(*x - max));
        }
        let mut lanes = _mm512_setzero_ps();
        for part in s.chunks(LANES) {
            let m = ((1u32 << part.len()) - 1) as u16;
            lanes = _mm512_add_ps(lanes, _mm512_maskz_loadu_ps(m, part.as_ptr()));
        }
        // A row with no key at all (no cache) gives zeros, as [`row_generic`] does.
        inv[r] = if row.keys.is_empty() {
            0.0
        } else {
            1.0 / reduce512(lanes)
        };
    }
    let p: [*const f32; 4] = std::array::from_fn(|r| scores[r.min(rows.len() - 1)].as_ptr());
    let base = out.as_mut_ptr();
    let o: [*mut f32; 4] = std::array::from_fn(|r| base.add(r.min(rows.len() - 1) * d));
    if shared > 0 {
        match rows.len() {
            1 => value_rows::<1>(p, kv, &first[..shared], o, masks),
            2 => value_rows::<2>(p, kv, &first[..shared], o, masks),
            3 => value_rows::<3>(p, kv, &first[..shared], o, masks),
            _ => value_rows::<4>(p, kv, &first[..shared], o, masks),
        }
    }
    for (r, row) in rows.iter().enumerate() {
        let (p, o) = ([p[r].add(shared); 4], [o[r]; 4]);
        value_rows::<1>(p, kv, &row.keys[shared..], o, masks);
        let inv = _mm512_set1_ps(inv[r]);
        for (c, &m) in masks.iter().enumerate() {
            let at = o[0].add(c * LANES);
            _mm512_mask_storeu_ps(at, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, at), inv));
        }
    }
}

/// `s[r][n] = scale · q[r]·k(keys[n])` for the first `R` rows, four keys at a time, each key's
/// chunks loaded once for the rows.
///
/// # Safety
/// The CPU has AVX-512F; each `q[r]` holds the head width, each `s[r]` `keys.len()` floats.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn score_rows<const R: usize>(
    q: [*const f32; 4],
    kv: &KeyValues,
    keys: &[usize],
    scale: f32,
    s: [*mut f32; 4],
    masks: &[std::arch::x86_64::__mmask16],
) {
    use super::dense_rows::reduce512;
    use std::arch::x86_64::*;
    for (g, group) in keys.chunks(4).enumerate() {
        let kp: [*const f32; 4] =
            std::array::from_fn(|t| kv.key(group[t.min(group.len() - 1)]).as_ptr());
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        for (c, &m) in masks.iter().enumerate() {
            let kc: [__m512; 4] =
                std::array::from_fn(|t| _mm512_maskz_loadu_ps(m, kp[t].add(c * LANES)));
            for (r, acc) in acc.iter_mut().enumerate() {
                let qc = _mm512_maskz_loadu_ps(m, q[r].add(c * LANES));
                for t in 0..4 {
                    acc[t] = _mm512_add_ps(acc[t], _mm512_mul_ps(qc, kc[t]));
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (t, &a) in acc.iter().enumerate().take(group.len()) {
                *s[r].add(4 * g + t) = reduce512(a) * scale;
            }
        }
    }
}

/// `o[r] += Σₙ p[r][n] · v(keys[n])` for the first `R` rows, in key order, four 16-channel
/// sums per row in registers at a time, each value chunk loaded once for the rows.
///
/// # Safety
/// The CPU has AVX-512F; each `p[r]` holds `keys.len()` floats, each `o[r]` the head width.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn value_rows<const R: usize>(
    p: [*const f32; 4],
    kv: &KeyValues,
    keys: &[usize],
    o: [*mut f32; 4],
    masks: &[std::arch::x86_64::__mmask16],
) {
    use std::arch::x86_64::*;
    if keys.is_empty() {
        return;
    }
    for c0 in (0..masks.len()).step_by(4) {
        let width = 4.min(masks.len() - c0);
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        for (r, acc) in acc.iter_mut().enumerate() {
            for (t, a) in acc.iter_mut().enumerate().take(width) {
                *a = _mm512_maskz_loadu_ps(masks[c0 + t], o[r].add((c0 + t) * LANES));
            }
        }
        for (n, &j) in keys.iter().enumerate() {
            let value = kv.value(j).as_ptr();
            let mut vc = [_mm512_setzero_ps(); 4];
            for (t, v) in vc.iter_mut().enumerate().take(width) {
                *v = _mm512_maskz_loadu_ps(masks[c0 + t], value.add((c0 + t) * LANES));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let pr = _mm512_set1_ps(*p[r].add(n));
                for t in 0..width {
                    acc[t] = _mm512_add_ps(acc[t], _mm512_mul_ps(pr, vc[t]));
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (t, &a) in acc.iter().enumerate().take(width) {
                _mm512_mask_storeu_ps(o[r].add((c0 + t) * LANES), masks[c0 + t], a);
            }
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
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has the features the function was compiled for.
            return unsafe { row_avx2(q, kv, visible, scale, scores, out) };
        }
    }
    row_generic::<false>(q, kv, visible, scale, scores, out)
}

/// [`decode_attention`] with AVX-512: the rows that share a key/value head (every query
/// position of its group of query heads) in tiles of up to four, [`tile_avx512`] each, written
/// into `out` `[B, Lq, H, d]`. Tiles are smaller where that keeps every thread busy (one
/// token's three rows per head on two threads).
#[cfg(target_arch = "x86_64")]
fn tiles_avx512(
    qv: &View,
    kv: &View,
    vv: &View,
    mask: &Mask,
    (b, lq, lk, h, hkv, d): (usize, usize, usize, usize, usize, usize),
    scale: f32,
    out: &mut [f32],
) {
    let groups = h / hkv;
    let per_head = lq * groups;
    let threads = rayon::current_num_threads().max(1);
    if out.is_empty() {
        return;
    }
    let split = (2 * threads).div_ceil(b * hkv).max(1);
    let tile = 4.min(per_head.div_ceil(split)).max(1);
    let tiles = per_head.div_ceil(tile);
    let done: Vec<Vec<f32>> = (0..b * hkv * tiles)
        .into_par_iter()
        .map_init(
            || (vec![Vec::new(); 4], vec![Vec::new(); 4]),
            |(lists, scores), task| {
                let (bi, head, t) = (task / (hkv * tiles), task / tiles % hkv, task % tiles);
                let members = (t * tile..per_head.min((t + 1) * tile)).collect::<Vec<_>>();
                let mut uniform = [false; 4];
                for (r, &m) in members.iter().enumerate() {
                    mask.visible_keys(bi, m / groups, &mut lists[r]);
                    if lists[r].is_empty() {
                        lists[r].extend(0..lk);
                        uniform[r] = true;
                    }
                }
                let rows = members
                    .iter()
                    .enumerate()
                    .map(|(r, &m)| TileRow {
                        q: qv.row(bi, head * groups + m % groups, m / groups, d),
                        keys: &lists[r],
                        uniform: uniform[r],
                    })
                    .collect::<Vec<_>>();
                let pair = KeyValues {
                    k: kv,
                    v: vv,
                    b: bi,
                    head,
                    d,
                };
                let mut o = vec![0f32; rows.len() * d];
                // SAFETY: the caller found AVX-512F; every row has `d` channels.
                unsafe { tile_avx512(&rows, &pair, scale, scores, &mut o) };
                o
            },
        )
        .collect();
    for (task, o) in done.iter().enumerate() {
        let (bi, head, t) = (task / (hkv * tiles), task / tiles % hkv, task % tiles);
        for (r, row) in o.chunks_exact(d).enumerate() {
            let m = t * tile + r;
            let (i, qh) = (m / groups, head * groups + m % groups);
            out[((bi * lq + i) * h + qh) * d..][..d].copy_from_slice(row);
        }
    }
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
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        tiles_avx512(
            &qv,
            &kv,
            &vv,
            &mask,
            (b, lq, lk, h, hkv, d),
            scale,
            &mut out,
        );
        drop((qs, ks, vs));
        return Tensor::from_vec(out, (b, lq, h, d), q.device())?.transpose(1, 2);
    }
    out.par_chunks_mut(d).enumerate().for_each_init(
        || (Vec::with_capacity(lk), vec![0f32; lk]),
        |(visible, scores), (n, o)| {
            let (b, i, head) = (n / (lq * h), n / h % lq, n % h);
            mask.visible_keys(b, i, visible);
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

    /// Every row of an AVX-512 tile has the plain row's bits: head widths inside, at and
    /// across chunks of 16, key counts around the groups of four, one to four rows with keys
    /// in common and each its own (a causal chain, tree branches, a padded key), a row that
    /// attends uniformly, and a row with no key.
    #[test]
    fn avx512_tiles_have_the_bits_of_the_plain_rows() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            let mut seed = 5u64;
            let mut rand = || {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            };
            let dev = candle_core::Device::Cpu;
            for d in [1, 15, 16, 17, 64, 80, 100, 128, 256] {
                for keys in [0, 1, 3, 4, 5, 17, 70] {
                    let kd: Vec<f32> = (0..keys * d).map(|_| rand() * 4.0).collect();
                    let vd: Vec<f32> = (0..keys * d).map(|_| rand()).collect();
                    let k = Tensor::from_vec(kd, (1, 1, keys, d), &dev).unwrap();
                    let v = Tensor::from_vec(vd, (1, 1, keys, d), &dev).unwrap();
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
                    let cached = keys.saturating_sub(3);
                    let every: Vec<usize> = (0..keys).collect();
                    // A chain over the cache; two tree branches; a padded cache key.
                    let chain: Vec<Vec<usize>> = (0..4)
                        .map(|i| (0..(cached + i).min(keys)).collect())
                        .collect();
                    let branch = |last: usize| -> Vec<usize> {
                        (0..cached).chain((last < keys).then_some(last)).collect()
                    };
                    let padded: Vec<usize> = (0..keys).filter(|j| j % 3 != 1).collect();
                    let sets: Vec<Vec<(Vec<usize>, bool)>> = vec![
                        vec![(every.clone(), false)],
                        vec![(padded.clone(), false)],
                        vec![(every.clone(), true)],
                        chain.iter().map(|c| (c.clone(), false)).collect(),
                        chain[..3].iter().map(|c| (c.clone(), false)).collect(),
                        vec![(branch(cached), false), (branch(cached + 1), false)],
                        vec![
                            (padded.clone(), false),
                            (every.clone(), true),
                            (chain[1].clone(), false),
                        ],
                    ];
                    let qs: Vec<Vec<f32>> = (0..4)
                        .map(|_| (0..d).map(|_| rand() * 4.0).collect())
                        .collect();
                    for set in &sets {
                        let rows: Vec<TileRow> = set
                            .iter()
                            .zip(&qs)
                            .map(|((keys, uniform), q)| TileRow {
                                q,
                                keys,
                                uniform: *uniform,
                            })
                            .collect();
                        let mut scratch = vec![Vec::new(); 4];
                        let mut fast = vec![0f32; rows.len() * d];
                        // SAFETY: the CPU has AVX-512F; every row has `d` channels.
                        unsafe { tile_avx512(&rows, &pair, 0.125, &mut scratch, &mut fast) };
                        for (r, row) in rows.iter().enumerate() {
                            let mut plain = vec![0f32; d];
                            let mut s = vec![0f32; keys];
                            row_generic::<false>(
                                row.q,
                                &pair,
                                (row.keys, row.uniform),
                                0.125,
                                &mut s,
                                &mut plain,
                            );
                            let bits =
                                |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                            assert_eq!(
                                bits(&fast[r * d..(r + 1) * d]),
                                bits(&plain),
                                "d {d}, {keys} keys, row {r} of {}",
                                rows.len()
                            );
                        }
                    }
                }
            }
        }
    }
}
