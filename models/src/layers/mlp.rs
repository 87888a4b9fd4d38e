//! The transformer feed-forward block, `fc2(act(fc1(x)))`.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::{Activation, Linear};

/// Two linear layers with an activation between them, named `fc1` / `fc2` as in CLIP, SigLIP
/// and BLIP checkpoints.
#[derive(Debug, Clone)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl Mlp {
    pub fn new(
        hidden: usize,
        intermediate: usize,
        act: Activation,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            fc1: Linear::new(hidden, intermediate, true, vb.pp("fc1"))?,
            fc2: Linear::new(intermediate, hidden, true, vb.pp("fc2"))?,
            act,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.act.forward(&self.fc1.forward(x)?)?)
    }
}
