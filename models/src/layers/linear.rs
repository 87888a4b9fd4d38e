//! Fully connected layer, `y = x Wᵀ + b`, matching `torch.nn.Linear`'s weight layout `[out, in]`.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// A linear projection with an optional bias.
///
/// Built from plain matmul and broadcast add, both of which have a backward in Candle.
///
/// A weight that is not (derived from) a training variable is kept transposed, `[in, out]` and contiguous,
/// with [`Self::weight`] a view of it. Candle's CPU matmul repacks a transposed (strided)
/// right-hand side at every call, which for a few rows, as in decoding several drafted tokens
/// or beams, costs several times the multiply: `[1376, 512]` against 2 rows took 0.8 ms, 0.2 ms
/// against the contiguous transpose (2 cores). A training variable stays `[out, in]`, where the
/// optimizer updates it, and training's many rows amortise the packing.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`.
    weight: Tensor,
    /// `[in, out]`, contiguous, when the weight does not come from a variable: `weight` is its
    /// view.
    weight_t: Option<Tensor>,
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
        Self::from_weights(weight, bias)
    }

    /// Wraps existing tensors, e.g. slices of a fused projection.
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        // A weight that is, or is computed from, a training variable (a slice of a fused
        // projection) must be read afresh at every forward: a transposed copy made now would
        // go stale at the first optimizer step.
        if weight.track_op() {
            return Ok(Self {
                weight,
                weight_t: None,
                bias,
            });
        }
        let weight_t = weight.t()?.contiguous()?;
        Ok(Self {
            weight: weight_t.t()?,
            weight_t: Some(weight_t),
            bias,
        })
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
        let y = match &self.weight_t {
            Some(weight_t) => x2.matmul(weight_t)?,
            None => x2.matmul(&self.weight.t()?)?,
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_shape = lead;
        out_shape.push(self.weight.dim(0)?);
        y.reshape(out_shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// A plain weight is served transposed; one computed from a variable (a slice of a fused
    /// projection) follows the variable's updates.
    #[test]
    fn plain_weights_are_transposed_and_variable_slices_stay_live() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1f32, 2.0], [3.0, 4.0], [5.0, 6.0]], &dev).unwrap();
        let w = Tensor::new(&[[1f32, 0.5], [-1.0, 2.0]], &dev).unwrap();
        let plain = Linear::from_weights(w.clone(), None).unwrap();
        assert!(plain.weight_t.as_ref().unwrap().is_contiguous());
        assert_eq!(
            plain.weight().to_vec2::<f32>().unwrap(),
            w.to_vec2::<f32>().unwrap()
        );
        let want = x.matmul(&w.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(plain.forward(&x).unwrap().to_vec2::<f32>().unwrap(), want);

        let fused = Var::from_tensor(&Tensor::cat(&[&w, &w], 0).unwrap()).unwrap();
        let half = Linear::from_weights(fused.as_tensor().narrow(0, 0, 2).unwrap(), None).unwrap();
        assert!(half.weight_t.is_none());
        fused.set(&(fused.as_tensor() * 2.0).unwrap()).unwrap();
        let doubled: Vec<Vec<f32>> = want
            .iter()
            .map(|row| row.iter().map(|v| v * 2.0).collect())
            .collect();
        assert_eq!(half.forward(&x).unwrap().to_vec2::<f32>().unwrap(), doubled);
    }
}
