//! Fused attention for the CPU in the FlashAttention-2 style (Dao 2023): `softmax(q kᵀ · scale
//! + mask) v` computed a block of queries at a time against blocks of keys with an online
//! softmax, so the `Lq × Lk` score matrix is never built.
//!
//! **Forward** (Dao 2023, algorithm 1), in parallel over (batch, head, query block): for each
//! key block, `S = scale · Q Kᵀ`, the running row maximum `m` and normaliser `ℓ` are updated,
//! the accumulator is rescaled by `exp(m_old − m_new)` and `exp(S − m) V` added. The output is
//! `acc / ℓ`, and the log-sum-exp `L = m + ln ℓ` of every row is kept for the backward.
//!
//! **Backward** (algorithm 2), with `D = rowsum(dO ∘ O)`: the probabilities of a block are
//! recomputed as `P = exp(S − L)`, then `dV += Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ∘ (dP − D)`,
//! `dK += scale · dSᵀ Q` in parallel over key blocks, and `dQ += scale · dS K` in parallel over
//! query blocks (two passes instead of atomics).
//!
//! Masks stay structured ([`KeyVisibility`]): causal with an offset, and key padding. A row that
//! sees no key at all (a padded query under a causal mask) attends uniformly to every key, which
//! is what the additive-mask path computes when all its scores are the dtype's minimum. Its
//! output then does not depend on q or k, and the backward gives them no gradient from it (the
//! additive path's autograd does, through scores that the mask's minimum absorbed).
//!
//! Inputs may be f32 or f16; blocks are computed in f32 and the output cast back.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::fast_math::exp_poly;

/// Queries per block.
const BLOCK_Q: usize = 64;
/// Keys per block.
const BLOCK_K: usize = 128;
/// The widest head the kernel takes.
pub const MAX_HEAD_DIM: usize = 256;

/// Which keys each query row may see.
#[derive(Debug, Clone, Default)]
pub struct KeyVisibility {
    /// Query `i` sits at absolute position `offset + i` and sees keys `0..=offset + i`.
    pub causal_offset: Option<usize>,
    /// `[B · Lk]`, false where a key is padding.
    pub keep: Option<Vec<bool>>,
    /// The queries are the nodes of a draft tree after the cached keys.
    pub tree: Option<Arc<TreeMask>>,
}

/// The visibility of `l` draft-tree nodes, queried after `cached` keys (the nodes' own keys
/// follow them): node `i` sees every cached key and node `j` where `visible[i][j]` (itself and
/// its ancestors). Ancestors come before their descendants, so `visible[i][j]` implies `j ≤ i`,
/// and every node sees itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeMask {
    cached: usize,
    visible: Vec<Vec<bool>>,
}

impl TreeMask {
    /// Checks that `visible` is square and that no node sees a later one.
    pub fn new(cached: usize, visible: Vec<Vec<bool>>) -> Result<Self> {
        let l = visible.len();
        for (i, row) in visible.iter().enumerate() {
            if row.len() != l {
                candle_core::bail!(
                    "draft tree: node {i} has {} visibility flags for {l} nodes",
                    row.len()
                );
            }
            if !row[i] {
                candle_core::bail!("draft tree: node {i} does not see itself");
            }
            if let Some(j) = row.iter().skip(i + 1).position(|&v| v) {
                candle_core::bail!("draft tree: node {i} sees the later node {}", i + 1 + j);
            }
        }
        Ok(Self { cached, visible })
    }

    /// Cached keys before the nodes.
    pub fn cached(&self) -> usize {
        self.cached
    }

    /// Nodes.
    pub fn len(&self) -> usize {
        self.visible.len()
    }

    pub fn is_empty(&self) -> bool {
        self.visible.is_empty()
    }

    /// Whether node `i` sees key `j` (cached keys first, then the nodes').
    pub fn sees(&self, i: usize, j: usize) -> bool {
        j < self.cached
            || self.visible[i]
                .get(j - self.cached)
                .copied()
                .unwrap_or(false)
    }
}

/// Shapes of one call: q `[B, H, Lq, d]`, k and v `[B, Hkv, Lk, d]`.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    hkv: usize,
    lq: usize,
    lk: usize,
    d: usize,
}

impl Dims {
    fn groups(&self) -> usize {
        self.h / self.hkv
    }
    /// Offset of query row `i` of head `h` in batch `b`.
    fn q_row(&self, b: usize, h: usize, i: usize) -> usize {
        ((b * self.h + h) * self.lq + i) * self.d
    }
    /// Offset of key row `j` of key/value head `hkv` in batch `b`.
    fn k_row(&self, b: usize, hkv: usize, j: usize) -> usize {
        ((b * self.hkv + hkv) * self.lk + j) * self.d
    }
    /// Query-shaped rows `i0..i0 + rows` of head `h` in batch `b` (of q, the output or its
    /// gradient).
    fn q_rows<'a>(
        &self,
        x: &'a [f32],
        (b, h): (usize, usize),
        i0: usize,
        rows: usize,
    ) -> &'a [f32] {
        &x[self.q_row(b, h, i0)..self.q_row(b, h, i0 + rows)]
    }
    /// Key-shaped rows `j0..j0 + cols` of key/value head `hkv` in batch `b` (of k or v).
    fn k_rows<'a>(
        &self,
        x: &'a [f32],
        (b, hkv): (usize, usize),
        j0: usize,
        cols: usize,
    ) -> &'a [f32] {
        &x[self.k_row(b, hkv, j0)..self.k_row(b, hkv, j0 + cols)]
    }
}

/// The mask, resolved for one call.
pub(crate) struct Mask<'a> {
    causal_offset: Option<usize>,
    keep: Option<&'a [bool]>,
    tree: Option<&'a TreeMask>,
    /// Per batch, the first kept key (`lk` when none).
    first_kept: Vec<usize>,
    lk: usize,
}

impl<'a> Mask<'a> {
    /// The mask of `lq` queries over `lk` keys in each of `b` batch rows; an error when a
    /// padding mask or a draft tree does not fit those sizes.
    pub(crate) fn new(vis: &'a KeyVisibility, b: usize, lq: usize, lk: usize) -> Result<Self> {
        if let Some(keep) = &vis.keep {
            if keep.len() != b * lk {
                candle_core::bail!(
                    "attention: a padding mask of {} entries for {b} rows of {lk} keys",
                    keep.len()
                );
            }
        }
        if let Some(tree) = &vis.tree {
            if tree.len() != lq || tree.cached + lq != lk {
                candle_core::bail!(
                    "attention: a draft tree of {} nodes after {} cached keys for {lq} queries \
                     over {lk} keys",
                    tree.len(),
                    tree.cached
                );
            }
        }
        let first_kept = (0..b)
            .map(|b| match &vis.keep {
                Some(keep) => keep[b * lk..(b + 1) * lk]
                    .iter()
                    .position(|&k| k)
                    .unwrap_or(lk),
                None => 0,
            })
            .collect();
        Ok(Self {
            causal_offset: vis.causal_offset,
            keep: vis.keep.as_deref(),
            tree: vis.tree.as_deref(),
            first_kept,
            lk,
        })
    }

    /// Keys `0..limit(i)` are not hidden by the causal mask (or the tree's order) from query
    /// `i`.
    fn limit(&self, i: usize) -> usize {
        let causal = match self.causal_offset {
            Some(offset) => (offset + i + 1).min(self.lk),
            None => self.lk,
        };
        match self.tree {
            Some(tree) => causal.min(tree.cached + i + 1),
            None => causal,
        }
    }

    /// Whether query `i` of batch `b` sees no key at all.
    pub(crate) fn blind(&self, b: usize, i: usize) -> bool {
        self.first_kept[b] >= self.limit(i)
    }

    /// The keys a block of queries `i0..i1` must visit: up to the last one's causal limit, or
    /// all of them when a row is blind (it attends uniformly to every key).
    fn key_range(&self, b: usize, i0: usize, i1: usize) -> usize {
        if (i0..i1).any(|i| self.blind(b, i)) {
            self.lk
        } else {
            self.limit(i1 - 1)
        }
    }

    /// The keys query `i` of batch `b` sees, in order, into `keys` (cleared first).
    pub(crate) fn visible_keys(&self, b: usize, i: usize, keys: &mut Vec<usize>) {
        keys.clear();
        let limit = self.limit(i);
        if self.keep.is_none() && self.tree.is_none() {
            keys.extend(0..limit);
        } else {
            keys.extend((0..limit).filter(|&j| self.visible(b, i, j)));
        }
    }

    pub(crate) fn visible(&self, b: usize, i: usize, j: usize) -> bool {
        j < self.limit(i)
            && self.keep.is_none_or(|keep| keep[b * self.lk + j])
            && self.tree.is_none_or(|tree| tree.sees(i, j))
    }
}

/// `x ← exp(x − shift)` over `xs`, returning the sum of the results.
#[inline(always)]
fn exp_shifted_generic(xs: &mut [f32], shift: f32) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (x, a) in chunk.iter_mut().zip(acc.iter_mut()) {
            *x = exp_poly(*x - shift);
            *a += *x;
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp_poly(*x - shift);
        sum += *x;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn exp_shifted_avx512(xs: &mut [f32], shift: f32) -> f32 {
    exp_shifted_generic(xs, shift)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp_shifted_avx2(xs: &mut [f32], shift: f32) -> f32 {
    exp_shifted_generic(xs, shift)
}

/// `x ← exp(x − shift)` over `xs` with the widest vectors the CPU has; returns the sum.
fn exp_shifted(xs: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the feature the function was compiled for.
            return unsafe { exp_shifted_avx512(xs, shift) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above.
            return unsafe { exp_shifted_avx2(xs, shift) };
        }
    }
    exp_shifted_generic(xs, shift)
}

/// The largest of `xs` and `init`.
fn max_of(xs: &[f32], init: f32) -> f32 {
    const LANES: usize = 16;
    let mut acc = [init; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (x, a) in chunk.iter().zip(acc.iter_mut()) {
            *a = if *x > *a { *x } else { *a };
        }
    }
    let m = acc.iter().fold(init, |a, &x| a.max(x));
    chunks.remainder().iter().fold(m, |a, &x| a.max(x))
}

/// `dst[m×n] = lhs[m×k] · rhs[k×n]` (plus `dst` when `accumulate`), each operand given with its
/// row and column strides, scaled by `beta`. Single-threaded: the callers run in parallel.
#[allow(clippy::too_many_arguments)]
fn gemm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    beta: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    // The bounds the raw-pointer call relies on.
    assert!(dst.len() >= m * n);
    assert!(lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
    assert!(rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    // SAFETY: the asserts above keep every index gemm touches inside the three slices, and
    // `dst` is borrowed mutably, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// The masked scores `S = scale · Q Kᵀ` of query rows `i0..i0+rows` (at `q`) against key rows
/// `j0..j0+cols` (at `k`) into `s` `[rows × cols]`: `-inf` where hidden, and 0 for every key
/// of a blind row.
#[allow(clippy::too_many_arguments)]
fn scores(
    mask: &Mask,
    b: usize,
    (i0, rows): (usize, usize),
    (j0, cols): (usize, usize),
    q: &[f32],
    k: &[f32],
    d: usize,
    scale: f32,
    s: &mut [f32],
) {
    gemm((rows, cols, d), s, false, q, (d, 1), k, (1, d), scale);
    for r in 0..rows {
        let i = i0 + r;
        let row = &mut s[r * cols..(r + 1) * cols];
        if mask.blind(b, i) {
            row.fill(0.0);
            continue;
        }
        let limit = mask.limit(i);
        if j0 + cols <= limit && mask.keep.is_none() && mask.tree.is_none() {
            continue;
        }
        for (c, x) in row.iter_mut().enumerate() {
            if !mask.visible(b, i, j0 + c) {
                *x = f32::NEG_INFINITY;
            }
        }
    }
}

/// Output `[B, H, Lq, d]` and log-sum-exp `[B, H, Lq]`.
fn forward(
    dims: Dims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &Mask,
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    let d = dims.d;
    let blocks: Vec<(usize, usize, usize)> = (0..dims.b)
        .flat_map(|b| {
            (0..dims.h).flat_map(move |h| (0..dims.lq).step_by(BLOCK_Q).map(move |i0| (b, h, i0)))
        })
        .collect();
    let done: Vec<(Vec<f32>, Vec<f32>)> = blocks
        .par_iter()
        .map(|&(b, h, i0)| {
            let rows = BLOCK_Q.min(dims.lq - i0);
            let hkv = h / dims.groups();
            let q_blk = dims.q_rows(q, (b, h), i0, rows);
            let mut m = vec![f32::NEG_INFINITY; rows];
            let mut l = vec![0f32; rows];
            let mut acc = vec![0f32; rows * d];
            let mut s = vec![0f32; rows * BLOCK_K];
            let upper = mask.key_range(b, i0, i0 + rows);
            for j0 in (0..upper).step_by(BLOCK_K) {
                let cols = BLOCK_K.min(upper - j0);
                let k_blk = dims.k_rows(k, (b, hkv), j0, cols);
                let v_blk = dims.k_rows(v, (b, hkv), j0, cols);
                let s = &mut s[..rows * cols];
                scores(mask, b, (i0, rows), (j0, cols), q_blk, k_blk, d, scale, s);
                for r in 0..rows {
                    let row = &mut s[r * cols..(r + 1) * cols];
                    let new_max = max_of(row, m[r]);
                    if new_max == f32::NEG_INFINITY {
                        // Nothing visible yet for this row.
                        row.fill(0.0);
                        continue;
                    }
                    let correction = (m[r] - new_max).exp();
                    m[r] = new_max;
                    let sum = exp_shifted(row, new_max);
                    l[r] = l[r] * correction + sum;
                    if correction != 1.0 {
                        acc[r * d..(r + 1) * d]
                            .iter_mut()
                            .for_each(|a| *a *= correction);
                    }
                }
                gemm(
                    (rows, d, cols),
                    &mut acc,
                    true,
                    s,
                    (cols, 1),
                    v_blk,
                    (d, 1),
                    1.0,
                );
            }
            let mut lse = vec![0f32; rows];
            for r in 0..rows {
                // ℓ is 0 only without any key (Lk = 0): a zero output, as the naive path gives.
                let inv = if l[r] > 0.0 { 1.0 / l[r] } else { 0.0 };
                acc[r * d..(r + 1) * d].iter_mut().for_each(|a| *a *= inv);
                lse[r] = m[r] + l[r].ln();
            }
            (acc, lse)
        })
        .collect();
    let mut out = Vec::with_capacity(q.len());
    let mut lse = Vec::with_capacity(q.len() / d.max(1));
    for (o, l) in done {
        out.extend(o);
        lse.extend(l);
    }
    (out, lse)
}

/// The recomputed probabilities `P = exp(S − L)` of a block, in place over its scores.
fn probabilities(s: &mut [f32], cols: usize, lse: &[f32]) {
    for (row, &l) in s.chunks_mut(cols).zip(lse) {
        exp_shifted(row, l);
    }
}

/// `dS = P ∘ (dP − D)` in place over `dp` for query rows `i0..`; zero for blind rows, whose
/// uniform weights do not depend on the scores.
fn score_gradient(
    dp: &mut [f32],
    p: &[f32],
    cols: usize,
    delta: &[f32],
    (mask, b, i0): (&Mask, usize, usize),
) {
    for (r, ((dp_row, p_row), &dl)) in dp
        .chunks_mut(cols)
        .zip(p.chunks(cols))
        .zip(delta)
        .enumerate()
    {
        if mask.blind(b, i0 + r) {
            dp_row.fill(0.0);
        } else {
            dp_row
                .iter_mut()
                .zip(p_row)
                .for_each(|(g, &p)| *g = p * (*g - dl));
        }
    }
}

/// What both backward passes need to recompute a block.
struct Recompute<'a> {
    mask: &'a Mask<'a>,
    d: usize,
    scale: f32,
    lse: &'a [f32],
    delta: &'a [f32],
}

impl Recompute<'_> {
    /// A block's probabilities `P = exp(S − L)` into `s` and its score gradient
    /// `dS = P ∘ (dO Vᵀ − D)` into `dp`: query rows `i0..i0 + rows` (row `r0` of the
    /// log-sum-exp) of batch `b` against key rows `j0..j0 + cols`.
    #[allow(clippy::too_many_arguments)]
    fn recompute(
        &self,
        b: usize,
        (i0, rows, r0): (usize, usize, usize),
        (j0, cols): (usize, usize),
        (q_blk, do_blk): (&[f32], &[f32]),
        (k_blk, v_blk): (&[f32], &[f32]),
        s: &mut [f32],
        dp: &mut [f32],
    ) {
        let (mask, d) = (self.mask, self.d);
        scores(
            mask,
            b,
            (i0, rows),
            (j0, cols),
            q_blk,
            k_blk,
            d,
            self.scale,
            s,
        );
        probabilities(s, cols, &self.lse[r0..r0 + rows]);
        gemm(
            (rows, cols, d),
            dp,
            false,
            do_blk,
            (d, 1),
            v_blk,
            (1, d),
            1.0,
        );
        score_gradient(dp, s, cols, &self.delta[r0..r0 + rows], (mask, b, i0));
    }
}

/// Gradients `(dq, dk, dv)` from the output gradient `dout`.
#[allow(clippy::too_many_arguments)]
fn backward(
    dims: Dims,
    (q, k, v): (&[f32], &[f32], &[f32]),
    out: &[f32],
    dout: &[f32],
    lse: &[f32],
    mask: &Mask,
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let d = dims.d;
    let delta: Vec<f32> = out
        .chunks(d)
        .zip(dout.chunks(d))
        .map(|(o, g)| o.iter().zip(g).map(|(a, b)| a * b).sum())
        .collect();
    let row = |b: usize, h: usize, i: usize| (b * dims.h + h) * dims.lq + i;
    let ctx = Recompute {
        mask,
        d,
        scale,
        lse,
        delta: &delta,
    };

    // dK and dV, a key block at a time, over every query head of its group.
    let key_blocks: Vec<(usize, usize, usize)> = (0..dims.b)
        .flat_map(|b| {
            (0..dims.hkv).flat_map(move |h| (0..dims.lk).step_by(BLOCK_K).map(move |j0| (b, h, j0)))
        })
        .collect();
    let dkv: Vec<(Vec<f32>, Vec<f32>)> = key_blocks
        .par_iter()
        .map(|&(b, hkv, j0)| {
            let cols = BLOCK_K.min(dims.lk - j0);
            let k_blk = dims.k_rows(k, (b, hkv), j0, cols);
            let v_blk = dims.k_rows(v, (b, hkv), j0, cols);
            let mut dk = vec![0f32; cols * d];
            let mut dv = vec![0f32; cols * d];
            let mut s = vec![0f32; BLOCK_Q * cols];
            let mut dp = vec![0f32; BLOCK_Q * cols];
            for h in hkv * dims.groups()..(hkv + 1) * dims.groups() {
                for i0 in (0..dims.lq).step_by(BLOCK_Q) {
                    let rows = BLOCK_Q.min(dims.lq - i0);
                    if mask.key_range(b, i0, i0 + rows) <= j0 {
                        continue;
                    }
                    let (s, dp) = (&mut s[..rows * cols], &mut dp[..rows * cols]);
                    let q_blk = dims.q_rows(q, (b, h), i0, rows);
                    let do_blk = dims.q_rows(dout, (b, h), i0, rows);
                    let r0 = row(b, h, i0);
                    ctx.recompute(
                        b,
                        (i0, rows, r0),
                        (j0, cols),
                        (q_blk, do_blk),
                        (k_blk, v_blk),
                        s,
                        dp,
                    );
                    gemm(
                        (cols, d, rows),
                        &mut dv,
                        true,
                        s,
                        (1, cols),
                        do_blk,
                        (d, 1),
                        1.0,
                    );
                    gemm(
                        (cols, d, rows),
                        &mut dk,
                        true,
                        dp,
                        (1, cols),
                        q_blk,
                        (d, 1),
                        scale,
                    );
                }
            }
            (dk, dv)
        })
        .collect();

    // dQ, a query block at a time.
    let query_blocks: Vec<(usize, usize, usize)> = (0..dims.b)
        .flat_map(|b| {
            (0..dims.h).flat_map(move |h| (0..dims.lq).step_by(BLOCK_Q).map(move |i0| (b, h, i0)))
        })
        .collect();
    let dq: Vec<Vec<f32>> = query_blocks
        .par_iter()
        .map(|&(b, h, i0)| {
            let rows = BLOCK_Q.min(dims.lq - i0);
            let hkv = h / dims.groups();
            let q_blk = dims.q_rows(q, (b, h), i0, rows);
            let do_blk = dims.q_rows(dout, (b, h), i0, rows);
            let r0 = row(b, h, i0);
            let mut dq = vec![0f32; rows * d];
            let mut s = vec![0f32; rows * BLOCK_K];
            let mut dp = vec![0f32; rows * BLOCK_K];
            let upper = mask.key_range(b, i0, i0 + rows);
            for j0 in (0..upper).step_by(BLOCK_K) {
                let cols = BLOCK_K.min(upper - j0);
                let k_blk = dims.k_rows(k, (b, hkv), j0, cols);
                let v_blk = dims.k_rows(v, (b, hkv), j0, cols);
                let (s, dp) = (&mut s[..rows * cols], &mut dp[..rows * cols]);
                ctx.recompute(
                    b,
                    (i0, rows, r0),
                    (j0, cols),
                    (q_blk, do_blk),
                    (k_blk, v_blk),
                    s,
                    dp,
                );
                gemm(
                    (rows, d, cols),
                    &mut dq,
                    true,
                    dp,
                    (cols, 1),
                    k_blk,
                    (d, 1),
                    scale,
                );
            }
            dq
        })
        .collect();

    let dk_len = k.len();
    let (mut dk, mut dv) = (Vec::with_capacity(dk_len), Vec::with_capacity(dk_len));
    for (a, b) in dkv {
        dk.extend(a);
        dv.extend(b);
    }
    (dq.concat(), dk, dv)
}

/// The fused attention op; the forward leaves the log-sum-exp here for the backward.
struct FusedAttention {
    scale: f32,
    visibility: KeyVisibility,
    lse: Mutex<Vec<f32>>,
}

/// The input as f32: borrowed when it is f32 already, converted from f16.
fn read_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<(Cow<'a, [f32]>, DType)> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("fused attention: {what} must be contiguous");
    };
    Ok(match storage {
        CpuStorage::F32(x) => (Cow::Borrowed(&x[start..end]), DType::F32),
        CpuStorage::F16(x) => (
            Cow::Owned(x[start..end].iter().map(|v| v.to_f32()).collect()),
            DType::F16,
        ),
        _ => candle_core::bail!("fused attention takes f32 or f16 {what}"),
    })
}

fn dims(q: &[usize], k: &[usize], v: &[usize]) -> Result<Dims> {
    let ([b, h, lq, d], [bk, hkv, lk, dk]) = (q, k) else {
        candle_core::bail!("fused attention takes [B, H, L, d] tensors, got {q:?} and {k:?}");
    };
    if k != v || b != bk || d != dk || *hkv == 0 || h % hkv != 0 || *d > MAX_HEAD_DIM {
        candle_core::bail!(
            "fused attention: q {q:?}, k {k:?} and v {v:?} do not fit together \
             (equal batch and head width ≤ {MAX_HEAD_DIM}, query heads a multiple of key heads)"
        );
    }
    Ok(Dims {
        b: *b,
        h: *h,
        hkv: *hkv,
        lq: *lq,
        lk: *lk,
        d: *d,
    })
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = dims(l1.dims(), l2.dims(), l3.dims())?;
        let (q, dtype) = read_f32(s1, l1, "q")?;
        let (k, _) = read_f32(s2, l2, "k")?;
        let (v, _) = read_f32(s3, l3, "v")?;
        let mask = Mask::new(&self.visibility, dims.b, dims.lq, dims.lk)?;
        let (out, lse) = forward(dims, &q, &k, &v, &mask, self.scale);
        *self.lse.lock().expect("lse lock") = lse;
        let storage = match dtype {
            DType::F16 => CpuStorage::F16(out.into_iter().map(half::f16::from_f32).collect()),
            _ => CpuStorage::F32(out),
        };
        Ok((storage, Shape::from(l1.dims())))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = dims(q.dims(), k.dims(), v.dims())?;
        let lse = self.lse.lock().expect("lse lock").clone();
        if lse.len() != dims.b * dims.h * dims.lq {
            candle_core::bail!("fused attention: backward without its forward's log-sum-exp");
        }
        let flat = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
        let (qf, kf, vf) = (flat(q)?, flat(k)?, flat(v)?);
        let mask = Mask::new(&self.visibility, dims.b, dims.lq, dims.lk)?;
        let (dq, dk, dv) = backward(
            dims,
            (&qf, &kf, &vf),
            &flat(out)?,
            &flat(grad_out)?,
            &lse,
            &mask,
            self.scale,
        );
        let wrap = |x: Vec<f32>, like: &Tensor| {
            Tensor::from_vec(x, like.shape(), like.device())?.to_dtype(like.dtype())
        };
        Ok((Some(wrap(dq, q)?), Some(wrap(dk, k)?), Some(wrap(dv, v)?)))
    }
}

/// Fused `softmax(q kᵀ · scale + mask) v` on the CPU: q `[B, H, Lq, d]`, k and v
/// `[B, Hkv, Lk, d]` with `H` a multiple of `Hkv` (grouped-query attention without repeating
/// the keys), `d` ≤ [`MAX_HEAD_DIM`], f32 or f16. Differentiable in q, k and v.
pub fn fused_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    visibility: KeyVisibility,
) -> Result<Tensor> {
    if !q.device().is_cpu() {
        candle_core::bail!("fused attention runs on the CPU; use the naive backend on {q:?}");
    }
    Mask::new(&visibility, k.dim(0)?, q.dim(2)?, k.dim(2)?)?;
    let op = FusedAttention {
        scale: scale as f32,
        visibility,
        lse: Mutex::new(Vec::new()),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

#[cfg(test)]
mod exp_tests {
    #[test]
    fn polynomial_exp_is_within_2e_7_relative_and_exact_at_the_ends() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = f64::from(x).exp();
            let got = f64::from(super::super::fast_math::exp_poly(x));
            worst = worst.max((got - want).abs() / want);
            x += 0.0137;
        }
        assert!(worst < 2e-7, "worst relative error {worst:e}");
        assert_eq!(super::super::fast_math::exp_poly(f32::NEG_INFINITY), 0.0);
        assert_eq!(super::super::fast_math::exp_poly(-100.0), 0.0);
        assert_eq!(super::super::fast_math::exp_poly(0.0), 1.0);
        let mut row = [0.5f32, f32::NEG_INFINITY, -3.0, 2.0];
        let row_len = row.len();
        let sum = super::exp_shifted(&mut row[..row_len], 2.0);
        let want: f32 = [0.5f32 - 2.0, -5.0, 0.0].iter().map(|v| v.exp()).sum();
        assert!((sum - want).abs() < 1e-6);
        assert_eq!(row[1], 0.0);
        assert_eq!(super::max_of(&[1.0, 7.0, -2.0], f32::NEG_INFINITY), 7.0);
    }
}
