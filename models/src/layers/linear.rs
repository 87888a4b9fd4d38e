//! Fully connected layer, `y = x Wᵀ + b`, matching `torch.nn.Linear`'s weight layout `[out, in]`.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// A linear projection with an optional bias.
///
/// Built from plain matmul and broadcast add, both of which have a backward in Candle.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads `weight` (and `bias` when `bias` is true) under `vb`.
    pub fn new(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// Wraps existing tensors, e.g. slices of a fused projection.
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Fold leading dimensions so the matmul is a single 2-D GEMM.
        let dims = x.dims();
        let in_dim = dims[dims.len() - 1];
        let lead: Vec<usize> = dims[..dims.len() - 1].to_vec();
        let rows = lead.iter().product::<usize>();
        let x2 = x.reshape((rows, in_dim))?;
        let y = x2.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_shape = lead;
        out_shape.push(self.weight.dim(0)?);
        y.reshape(out_shape)
    }
}
