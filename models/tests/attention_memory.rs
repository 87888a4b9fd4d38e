//! Peak memory of attention at N = 4096, measured by a counting global allocator: the fused
//! kernel never allocates an N×N score matrix, forward or backward, and needs at most 1/8 of
//! the naive path's peak; inside a model the backend switch decides which one runs.
//!
//! One test in this binary, so no other test allocates while it measures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor, Var};
use zoo_models::layers::{
    fused_attention, naive_attention, set_attention_backend, AttentionBackend, AttentionConfig,
    AttentionMask, KeyVisibility, MultiHeadAttention,
};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(size: usize) {
    let now = CURRENT.fetch_add(size, Ordering::SeqCst) + size;
    PEAK.fetch_max(now, Ordering::SeqCst);
}

// SAFETY: every call is forwarded to the system allocator unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::SeqCst);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            CURRENT.fetch_sub(layout.size(), Ordering::SeqCst);
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Bytes allocated at the peak of `f` above what was live when it started.
fn peak_of(f: impl FnOnce()) -> usize {
    let base = CURRENT.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    f();
    PEAK.load(Ordering::SeqCst) - base
}

const N: usize = 4096;
const HEADS: usize = 2;
const D: usize = 64;

fn ramp(shape: &[usize], phase: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.618 + phase).sin()).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

#[test]
fn fused_attention_at_4096_tokens_never_builds_the_score_matrix() {
    let scores_bytes = HEADS * N * N * 4;
    let q = Var::from_tensor(&ramp(&[1, HEADS, N, D], 0.0)).unwrap();
    let k = Var::from_tensor(&ramp(&[1, HEADS, N, D], 1.0)).unwrap();
    let v = Var::from_tensor(&ramp(&[1, HEADS, N, D], 2.0)).unwrap();
    let scale = (D as f64).powf(-0.5);

    let train_step = |fused: bool| {
        peak_of(|| {
            let out = if fused {
                let vis = KeyVisibility {
                    causal_offset: Some(0),
                    ..KeyVisibility::default()
                };
                fused_attention(&q, &k, &v, scale, vis).unwrap()
            } else {
                naive_attention(&q, &k, &v, scale, &AttentionMask::causal(0)).unwrap()
            };
            let grads = out.sum_all().unwrap().backward().unwrap();
            assert!(grads.get(&q).is_some() && grads.get(&v).is_some());
        })
    };
    let naive = train_step(false);
    let fused = train_step(true);
    println!(
        "forward + backward at N = {N}, {HEADS} heads of {D}: naive peak {} MiB, fused {} MiB",
        naive >> 20,
        fused >> 20
    );
    assert!(naive >= scores_bytes, "naive peaked at {naive} bytes");
    // Less than a single head's N×N f32 scores: everything it holds is O(N·d).
    assert!(
        fused < N * N * 4,
        "fused peaked at {fused} bytes: one head's N×N scores are {}",
        N * N * 4
    );
    assert!(fused * 8 <= naive, "fused {fused} vs naive {naive}");

    // Inside a model: the same attention layer under each backend (inference).
    let e = HEADS * D;
    let vb = candle_nn::VarBuilder::zeros(DType::F32, &Device::Cpu);
    let attn = MultiHeadAttention::new(&AttentionConfig::clip_style(e, HEADS), vb).unwrap();
    let x = ramp(&[1, N, e], 0.5);
    let layer = |backend| {
        set_attention_backend(backend);
        let peak = peak_of(|| {
            attn.forward(&x, &AttentionMask::causal(0)).unwrap();
        });
        set_attention_backend(AttentionBackend::Auto);
        peak
    };
    let naive = layer(AttentionBackend::Naive);
    let fused = layer(AttentionBackend::Fused);
    println!(
        "attention layer forward: naive peak {} MiB, fused {} MiB",
        naive >> 20,
        fused >> 20
    );
    assert!(naive >= scores_bytes);
    assert!(fused * 8 <= naive, "fused {fused} vs naive {naive}");
}
