//! The decode attention kernel (a few queries at inference, row by row):
//! - against the naive backend within 1e-5 over causal masks with a cache offset, padding,
//!   rows that see no key, grouped-query attention, head widths that are not a multiple of 16,
//!   draft trees, and keys and values read in place from a larger cache buffer;
//! - row-exact: every query row has the bits it has when it is the only query, over exactly
//!   the keys it sees, which is what keeps speculative decoding identical to greedy decoding.

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use zoo_models::layers::{
    decode_attention, naive_attention, AttentionMask, KeyVisibility, TreeMask,
};

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// A tree of `l` nodes: node `i`'s parent is a pseudo-random earlier node (or none).
fn tree(l: usize, seed: u64) -> Vec<Vec<bool>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let parents: Vec<Option<usize>> = (0..l)
        .map(|i| (i > 0 && rng.random_range(0..4) > 0).then(|| rng.random_range(0..i)))
        .collect();
    (0..l)
        .map(|i| {
            let mut row = vec![false; l];
            let mut at = Some(i);
            while let Some(j) = at {
                row[j] = true;
                at = parents[j];
            }
            row
        })
        .collect()
}

/// `k` and `v` `[B, Hkv, Lk, d]` as views of the first `lk` positions of a buffer twice as
/// long, as the KV cache hands them out.
fn cached_keys(b: usize, hkv: usize, lk: usize, d: usize, seed: u64) -> (Tensor, Tensor) {
    let k = randn(&[b, hkv, 2 * lk, d], seed).narrow(2, 0, lk).unwrap();
    let v = randn(&[b, hkv, 2 * lk, d], seed + 1)
        .narrow(2, 0, lk)
        .unwrap();
    assert!(b * hkv == 1 || !k.is_contiguous());
    (k, v)
}

/// (name, b, h, hkv, lq, lk, d, mask)
type Case = (
    &'static str,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    AttentionMask,
);

#[test]
fn decode_attention_matches_the_naive_backend() {
    let keep = |b: usize, lk: usize, pad: usize| {
        let data: Vec<u32> = (0..b)
            .flat_map(|r| (0..lk).map(move |j| u32::from(r == 0 || j >= pad)))
            .collect();
        Tensor::from_vec(data, (b, lk), &Device::Cpu).unwrap()
    };
    let cases: Vec<Case> = vec![
        ("one query", 1, 9, 3, 1, 300, 64, AttentionMask::none()),
        (
            "a chain after a cache",
            1,
            9,
            3,
            7,
            40,
            64,
            AttentionMask::causal(33),
        ),
        (
            "odd head width",
            2,
            4,
            2,
            5,
            19,
            20,
            AttentionMask::causal(14),
        ),
        (
            "64 queries",
            1,
            4,
            1,
            64,
            100,
            32,
            AttentionMask::causal(36),
        ),
        (
            "padding, with blind rows",
            2,
            2,
            2,
            6,
            12,
            16,
            AttentionMask::causal(0).with_padding(Some(&keep(2, 12, 3))),
        ),
        (
            "a draft tree",
            1,
            9,
            3,
            26,
            50,
            64,
            AttentionMask::tree(TreeMask::new(24, tree(26, 7)).unwrap()),
        ),
    ];
    for (name, b, h, hkv, lq, lk, d, mask) in cases {
        let q = randn(&[b, h, lq, d], 1);
        let (k, v) = cached_keys(b, hkv, lk, d, 2);
        let scale = (d as f64).powf(-0.5);
        let want = naive_attention(&q, &k, &v, scale, &mask).unwrap();
        let vis = visibility(&mask);
        let got = decode_attention(&q, &k, &v, scale, &vis).unwrap();
        assert_eq!(got.dims(), want.dims(), "{name}");
        let diff = max_abs_diff(&got, &want);
        assert!(diff < 1e-5, "{name}: {diff}");
        // The cache view and a contiguous copy give the same bits.
        let dense = decode_attention(
            &q,
            &k.contiguous().unwrap(),
            &v.contiguous().unwrap(),
            scale,
            &vis,
        )
        .unwrap();
        assert_eq!(bits(&got), bits(&dense), "{name}: a view of the cache");
    }
}

/// The structured visibility the mask carries (the kernel's input).
fn visibility(mask: &AttentionMask) -> KeyVisibility {
    mask.key_visibility().unwrap().expect("a structured mask")
}

/// Every row of a call is the bits of that row computed alone over the keys it sees: for a
/// chain (causal after a cache) and for a tree, where a node sees the cache and its ancestors.
#[test]
fn each_query_row_has_the_bits_of_that_query_alone() {
    let (b, h, hkv, d) = (1, 6, 2, 64);
    let scale = 0.125;
    let (cached, l) = (45, 20);
    let lk = cached + l;
    let q = randn(&[b, h, l, d], 11);
    let (k, v) = cached_keys(b, hkv, lk, d, 12);
    let alone = |i: usize, seen: &[usize]| {
        let index = Tensor::new(
            seen.iter().map(|&j| j as u32).collect::<Vec<_>>(),
            &Device::Cpu,
        )
        .unwrap();
        let (ki, vi) = (
            k.contiguous().unwrap().index_select(&index, 2).unwrap(),
            v.contiguous().unwrap().index_select(&index, 2).unwrap(),
        );
        let qi = q.narrow(2, i, 1).unwrap();
        bits(&decode_attention(&qi, &ki, &vi, scale, &KeyVisibility::default()).unwrap())
    };
    let chain = decode_attention(
        &q,
        &k,
        &v,
        scale,
        &KeyVisibility {
            causal_offset: Some(cached),
            ..KeyVisibility::default()
        },
    )
    .unwrap();
    let shape = tree(l, 3);
    let tree_vis = KeyVisibility {
        tree: Some(std::sync::Arc::new(
            TreeMask::new(cached, shape.clone()).unwrap(),
        )),
        ..KeyVisibility::default()
    };
    let in_tree = decode_attention(&q, &k, &v, scale, &tree_vis).unwrap();
    for (i, sees) in shape.iter().enumerate() {
        let prefix: Vec<usize> = (0..=cached + i).collect();
        assert_eq!(
            bits(&chain.narrow(2, i, 1).unwrap()),
            alone(i, &prefix),
            "chain row {i}"
        );
        let seen: Vec<usize> = (0..cached)
            .chain((0..l).filter(|&j| sees[j]).map(|j| cached + j))
            .collect();
        assert_eq!(
            bits(&in_tree.narrow(2, i, 1).unwrap()),
            alone(i, &seen),
            "tree node {i}"
        );
    }
}

#[test]
fn malformed_trees_are_refused() {
    assert!(TreeMask::new(3, vec![vec![true, true], vec![false, true]]).is_err());
    assert!(TreeMask::new(3, vec![vec![false]]).is_err());
    assert!(TreeMask::new(3, vec![vec![true, false]]).is_err());
    let q = randn(&[1, 1, 2, 8], 1);
    let (k, v) = cached_keys(1, 1, 5, 8, 2);
    let vis = KeyVisibility {
        tree: Some(std::sync::Arc::new(
            TreeMask::new(2, vec![vec![true, false], vec![true, true]]).unwrap(),
        )),
        ..KeyVisibility::default()
    };
    // Two nodes after two cached keys are four keys, not five.
    assert!(decode_attention(&q, &k, &v, 1.0, &vis).is_err());
}

/// An empty batch, or no query, gives an empty output rather than a panic.
#[test]
fn empty_batches_and_queries_give_empty_outputs() {
    let vis = KeyVisibility::default();
    let (k, v) = (randn(&[0, 3, 5, 16], 1), randn(&[0, 3, 5, 16], 2));
    let out = decode_attention(&randn(&[0, 9, 2, 16], 3), &k, &v, 1.0, &vis).unwrap();
    assert_eq!(out.dims(), &[0, 9, 2, 16]);
    let (k, v) = (randn(&[1, 3, 5, 16], 4), randn(&[1, 3, 5, 16], 5));
    let out = decode_attention(&randn(&[1, 9, 0, 16], 6), &k, &v, 1.0, &vis).unwrap();
    assert_eq!(out.dims(), &[1, 9, 0, 16]);
}
