//! RoPE against HF's `apply_rotary_pos_emb` (LlamaRotaryEmbedding, base 10000, head_dim 16).

use candle_core::Device;
use zoo_models::layers::RotaryEmbedding;

#[test]
fn rope_matches_hf_apply_rotary_pos_emb() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/rope.safetensors");
    let r = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let rope = RotaryEmbedding::new(16, 64, 10000.0, &Device::Cpu).unwrap();
    let pos = r["position_ids"].to_dtype(candle_core::DType::U32).unwrap();
    for (x, expected) in [("q", "q_rot"), ("k", "k_rot")] {
        let got = rope.apply(&r[x], &pos).unwrap();
        let d: f32 = (got - &r[expected])
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(d < 1e-5, "{x}: differs from HF by {d}");
    }
}
