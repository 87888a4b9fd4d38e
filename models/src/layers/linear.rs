//! Fully connected layer, `y = x Wᵀ + b`, matching `torch.nn.Linear`'s weight layout `[out, in]`.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
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
///
/// A decoder's projection ([`Self::for_decoding`], as [`QuantizedWeights::linear`] gives for a
/// language model) keeps its weight `[out, in]` and contiguous instead, for the few-row
/// kernel of [`super::dense_rows`]: decoding streams each weight row front to back.
///
/// A quantized weight (a GGUF checkpoint's Q4_0 … Q8_0 or K-quant blocks, see
/// [`QuantizedWeights`]) stays in its blocks and is multiplied by candle's quantized matmul;
/// it has no backward.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

#[derive(Debug, Clone)]
enum Weight {
    Dense {
        /// `[out, in]`.
        weight: Tensor,
        /// `[in, out]`, contiguous, when the weight does not come from a variable: `weight`
        /// is its view.
        weight_t: Option<Tensor>,
        /// `weight` is contiguous and serves few rows by [`super::dense_rows`].
        rows: bool,
    },
    /// `[out, in]` in ggml blocks along `in`.
    Quantized(Arc<QTensor>),
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
                weight: Weight::Dense {
                    weight,
                    weight_t: None,
                    rows: false,
                },
                bias,
            });
        }
        let weight_t = weight.t()?.contiguous()?;
        Ok(Self {
            weight: Weight::Dense {
                weight: weight_t.t()?,
                weight_t: Some(weight_t),
                rows: false,
            },
            bias,
        })
    }

    /// A projection laid out for decoding: a plain (not variable) f32 `weight` `[out, in]` is
    /// kept as it is, contiguous (a tied `lm_head` shares the embedding table), and rows on the
    /// CPU are multiplied by [`super::dense_rows`]; elsewhere the GEMM takes its transpose.
    /// Other weights are taken as [`Self::from_weights`] takes them.
    pub fn decoding(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        if weight.track_op() || weight.dtype() != candle_core::DType::F32 {
            return Self::from_weights(weight, bias);
        }
        Ok(Self {
            weight: Weight::Dense {
                weight: weight.contiguous()?,
                weight_t: None,
                rows: true,
            },
            bias,
        })
    }

    /// This projection laid out for decoding, as [`Self::decoding`] lays it out.
    pub fn for_decoding(self) -> Result<Self> {
        match self.weight {
            Weight::Dense {
                weight,
                weight_t: Some(_),
                ..
            } => Self::decoding(weight, self.bias),
            weight => Ok(Self {
                weight,
                bias: self.bias,
            }),
        }
    }

    /// A projection by a quantized `[out, in]` weight. Float blocks (F32, F16, BF16) are
    /// dequantized into a plain weight instead.
    pub fn quantized(weight: Arc<QTensor>, bias: Option<Tensor>) -> Result<Self> {
        use candle_core::quantized::GgmlDType;
        if matches!(
            weight.dtype(),
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
        ) {
            let dense = weight.dequantize(&weight.device())?;
            return Self::from_weights(dense, bias);
        }
        weight.shape().dims2()?;
        Ok(Self {
            weight: Weight::Quantized(weight),
            bias,
        })
    }

    /// The `[out, in]` weight; a quantized one dequantized to f32.
    pub fn weight(&self) -> Result<Tensor> {
        match &self.weight {
            Weight::Dense { weight, .. } => Ok(weight.clone()),
            Weight::Quantized(q) => q.dequantize(&q.device()),
        }
    }

    /// The quantized weight, when the projection has one.
    pub fn quantized_weight(&self) -> Option<&Arc<QTensor>> {
        match &self.weight {
            Weight::Quantized(q) => Some(q),
            Weight::Dense { .. } => None,
        }
    }

    /// Output features.
    pub fn out_dim(&self) -> Result<usize> {
        match &self.weight {
            Weight::Dense { weight, .. } => weight.dim(0),
            Weight::Quantized(q) => Ok(q.shape().dims2()?.0),
        }
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The projection onto output features `0..n` only: the first `n` rows of the weight
    /// (block rows of a quantized one, copied as they are).
    pub fn first_rows(&self, n: usize) -> Result<Self> {
        let out = self.out_dim()?;
        if n == 0 || n > out {
            candle_core::bail!("cannot keep {n} of the {out} output features of a projection");
        }
        let bias = self.bias.as_ref().map(|b| b.narrow(0, 0, n)).transpose()?;
        match &self.weight {
            Weight::Dense {
                weight, rows: true, ..
            } => Self::decoding(weight.narrow(0, 0, n)?, bias),
            Weight::Dense { weight, .. } => Self::from_weights(weight.narrow(0, 0, n)?, bias),
            Weight::Quantized(q) => {
                use candle_core::quantized::QStorage;
                let (rows, cols) = q.shape().dims2()?;
                let data = q.data()?;
                let row_bytes = data.len() / rows;
                let kept = QStorage::from_data(
                    std::borrow::Cow::Borrowed(&data[..n * row_bytes]),
                    &q.device(),
                    q.dtype(),
                )?;
                Self::quantized(Arc::new(QTensor::new(kept, (n, cols))?), bias)
            }
        }
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
        let y = match &self.weight {
            Weight::Dense {
                weight_t: Some(weight_t),
                ..
            } => match dense_forward(weight_t, &x2)? {
                Some(y) => y,
                None => x2.matmul(weight_t)?,
            },
            Weight::Dense {
                weight, rows: true, ..
            } => match rows_forward(weight, &x2)? {
                Some(y) => y,
                None => x2.matmul(&weight.t()?)?,
            },
            Weight::Dense { weight, .. } => x2.matmul(&weight.t()?)?,
            Weight::Quantized(q) => quantized_forward(q, &x2)?,
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_shape = lead;
        out_shape.push(self.out_dim()?);
        y.reshape(out_shape)
    }
}

/// `x [m, k] · weightᵀ` for a contiguous `weight [n, k]` by [`super::dense_rows`] for f32
/// rows on the CPU outside a training graph; `None` where the GEMM serves instead.
fn rows_forward(weight: &Tensor, x: &Tensor) -> Result<Option<Tensor>> {
    let n = weight.dim(0)?;
    cpu_f32_forward(weight, n, x, super::dense_rows::matmul)
}

/// `x [m, k] · weight_t [k, n]` by this crate's small-row kernel ([`super::dense_matmul`]) for a
/// few f32 rows on the CPU outside a training graph; `None` where the GEMM serves instead.
fn dense_forward(weight_t: &Tensor, x: &Tensor) -> Result<Option<Tensor>> {
    if x.dim(0)? > super::dense_matmul::ROWS {
        return Ok(None);
    }
    let n = weight_t.dim(1)?;
    cpu_f32_forward(weight_t, n, x, super::dense_matmul::matmul)
}

/// `(x, m, k, w, n, out)`: a small-row f32 kernel.
type DenseKernel = fn(&[f32], usize, usize, &[f32], usize, &mut [f32]);

/// `kernel(x, m, k, w, n, out)` on the contiguous f32 storage of `x [m, k]` and `w` on the CPU,
/// outside a training graph; `None` where the GEMM serves instead.
fn cpu_f32_forward(
    w: &Tensor,
    n: usize,
    x: &Tensor,
    kernel: DenseKernel,
) -> Result<Option<Tensor>> {
    use candle_core::{CpuStorage, DType, Storage};
    let (m, k) = x.dims2()?;
    if !(x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 && !x.track_op())
    {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let mut out = vec![0f32; m * n];
    {
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(xd)), Storage::Cpu(CpuStorage::F32(wd))) = (&*xs, &*ws)
        else {
            return Ok(None);
        };
        let (Some((x0, x1)), Some((w0, w1))) = (xl.contiguous_offsets(), wl.contiguous_offsets())
        else {
            return Ok(None);
        };
        kernel(&xd[x0..x1], m, k, &wd[w0..w1], n, &mut out);
    }
    Ok(Some(Tensor::from_vec(out, (m, n), x.device())?))
}

/// `x [m, k] · Wᵀ` for a quantized `W`: this crate's small-row kernel on the CPU for the
/// types it has ([`super::quantized_matmul`]), candle's quantized matmul otherwise.
fn quantized_forward(q: &Arc<QTensor>, x: &Tensor) -> Result<Tensor> {
    use super::quantized_matmul;
    let (n, k) = q.shape().dims2()?;
    let (m, _) = x.dims2()?;
    if x.device().is_cpu()
        && x.dtype() == candle_core::DType::F32
        && quantized_matmul::supports(q.dtype())
    {
        let x = x.contiguous()?;
        let data = q.data()?;
        let mut out = vec![0f32; m * n];
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        if quantized_matmul::matmul(&xs, m, k, &data, q.dtype(), n, &mut out) {
            return Tensor::from_vec(out, (m, n), x.device());
        }
    }
    QMatMul::QTensor(q.clone()).forward(&x.contiguous()?)
}

/// Quantized weights by full tensor name (`model.layers.0.self_attn.q_proj.weight`), which
/// replace the dense ones a [`VarBuilder`] would give: [`Self::linear`] loads a projection
/// from here when it is here, from the `VarBuilder` otherwise. Empty for a plain checkpoint.
#[derive(Debug, Clone, Default)]
pub struct QuantizedWeights {
    tensors: Arc<HashMap<String, Arc<QTensor>>>,
    /// The projections are a decoder's: [`Linear::for_decoding`].
    decoding: bool,
}

impl QuantizedWeights {
    pub fn new(tensors: HashMap<String, Arc<QTensor>>) -> Self {
        Self {
            tensors: Arc::new(tensors),
            decoding: false,
        }
    }

    /// The same weights, whose projections [`Self::linear`] lays out for decoding
    /// ([`Linear::for_decoding`]), as a language model's are.
    pub fn for_decoding(&self) -> Self {
        Self {
            tensors: self.tensors.clone(),
            decoding: true,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<QTensor>> {
        self.tensors.get(name)
    }

    /// The `[out_dim, in_dim]` projection under `vb` (`weight`, and `bias` when `bias`):
    /// quantized when its weight is here, with the shape checked.
    pub fn linear(
        &self,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Linear> {
        let linear = self.load(in_dim, out_dim, bias, vb)?;
        if self.decoding {
            linear.for_decoding()
        } else {
            Ok(linear)
        }
    }

    fn load(&self, in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
        let name = format!("{}.weight", vb.prefix());
        let Some(q) = self.tensors.get(&name) else {
            return Linear::new(in_dim, out_dim, bias, vb);
        };
        if q.shape().dims() != [out_dim, in_dim] {
            candle_core::bail!(
                "{name} has shape {:?}, the config says [{out_dim}, {in_dim}]",
                q.shape().dims()
            );
        }
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Linear::quantized(q.clone(), bias)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// A decoder's projection keeps its `[out, in]` weight (also when cut to its first rows)
    /// and gives the plain projection's values; a variable's stays with the GEMM.
    #[test]
    fn a_decoding_projection_keeps_its_layout_and_gives_the_plain_projection() {
        use candle_core::Device;
        let w = Tensor::randn(0f32, 1.0, (70, 33), &Device::Cpu).unwrap();
        let b = Tensor::randn(0f32, 1.0, 70, &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 5, 33), &Device::Cpu).unwrap();
        let plain = Linear::from_weights(w.clone(), Some(b.clone())).unwrap();
        let decoding = Linear::decoding(w.clone(), Some(b)).unwrap();
        assert!(matches!(
            decoding.weight,
            Weight::Dense {
                rows: true,
                weight_t: None,
                ..
            }
        ));
        let diff = |a: &Tensor, b: &Tensor| -> f32 {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        let (p, d) = (plain.forward(&x).unwrap(), decoding.forward(&x).unwrap());
        assert!(diff(&p, &d) < 1e-5, "{}", diff(&p, &d));
        assert!(matches!(
            plain.clone().for_decoding().unwrap().weight,
            Weight::Dense { rows: true, .. }
        ));
        let part = decoding.first_rows(10).unwrap();
        assert!(matches!(part.weight, Weight::Dense { rows: true, .. }));
        let pd = part.forward(&x).unwrap();
        assert!(diff(&pd, &d.narrow(2, 0, 10).unwrap()) == 0.0);
        let var = candle_core::Var::from_tensor(&w).unwrap();
        let trained = Linear::decoding(var.as_tensor().clone(), None).unwrap();
        assert!(matches!(trained.weight, Weight::Dense { rows: false, .. }));
    }

    /// A plain weight is served transposed; one computed from a variable (a slice of a fused
    /// projection) follows the variable's updates.
    #[test]
    fn plain_weights_are_transposed_and_variable_slices_stay_live() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1f32, 2.0], [3.0, 4.0], [5.0, 6.0]], &dev).unwrap();
        let w = Tensor::new(&[[1f32, 0.5], [-1.0, 2.0]], &dev).unwrap();
        let plain = Linear::from_weights(w.clone(), None).unwrap();
        let Weight::Dense { weight_t, .. } = &plain.weight else {
            panic!("dense")
        };
        assert!(weight_t.as_ref().unwrap().is_contiguous());
        assert_eq!(
            plain.weight().unwrap().to_vec2::<f32>().unwrap(),
            w.to_vec2::<f32>().unwrap()
        );
        let want = x.matmul(&w.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(plain.forward(&x).unwrap().to_vec2::<f32>().unwrap(), want);

        let fused = Var::from_tensor(&Tensor::cat(&[&w, &w], 0).unwrap()).unwrap();
        let half = Linear::from_weights(fused.as_tensor().narrow(0, 0, 2).unwrap(), None).unwrap();
        assert!(matches!(half.weight, Weight::Dense { weight_t: None, .. }));
        fused.set(&(fused.as_tensor() * 2.0).unwrap()).unwrap();
        let doubled: Vec<Vec<f32>> = want
            .iter()
            .map(|row| row.iter().map(|v| v * 2.0).collect())
            .collect();
        assert_eq!(half.forward(&x).unwrap().to_vec2::<f32>().unwrap(), doubled);
    }
}
