//! Fully connected layer, `y = x Wᵀ + b`, matching `torch.nn.Linear`'s weight layout `[out, in]`.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::quantized_matmul::{Interleaved, Packing};

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
    /// Q8_0, Q4_0 or Q4_1 `[out, in]` repacked for the CPU's interleaved kernel
    /// ([`super::quantized_matmul::Interleaved`]), in place of the checkpoint's layout.
    Interleaved(Arc<Interleaved>),
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
    ///
    /// Q8_0, Q4_0 and Q4_1 on a CPU with the interleaved kernel are repacked for it (in place
    /// of the checkpoint's layout, which [`Self::weight`] and the others rebuild when asked).
    pub fn quantized(weight: Arc<QTensor>, bias: Option<Tensor>) -> Result<Self> {
        if matches!(
            weight.dtype(),
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
        ) {
            let dense = weight.dequantize(&weight.device())?;
            return Self::from_weights(dense, bias);
        }
        let (n, k) = weight.shape().dims2()?;
        if Packing::of(weight.dtype()).is_some() && weight.device().is_cpu() {
            if let Some(packed) = Interleaved::pack(&weight.data()?, weight.dtype(), n, k) {
                return Ok(Self {
                    weight: Weight::Interleaved(Arc::new(packed)),
                    bias,
                });
            }
        }
        Ok(Self {
            weight: Weight::Quantized(weight),
            bias,
        })
    }

    /// A quantized weight in the checkpoint's layout (rebuilt from a repacked one).
    fn block_rows(&self) -> Result<Option<Arc<QTensor>>> {
        match &self.weight {
            Weight::Quantized(q) => Ok(Some(q.clone())),
            Weight::Interleaved(w) => {
                let bytes = std::borrow::Cow::Owned(w.unpack());
                let storage = QStorage::from_data(bytes, &candle_core::Device::Cpu, w.dtype())?;
                Ok(Some(Arc::new(QTensor::new(storage, w.shape())?)))
            }
            Weight::Dense { .. } => Ok(None),
        }
    }

    /// The `[out, in]` weight; a quantized one dequantized to f32.
    pub fn weight(&self) -> Result<Tensor> {
        if let Weight::Dense { weight, .. } = &self.weight {
            return Ok(weight.clone());
        }
        match self.block_rows()? {
            Some(q) => q.dequantize(&q.device()),
            None => candle_core::bail!("a quantized projection without its blocks"),
        }
    }

    /// The weight's quantized type, when it has one.
    pub fn quantized_dtype(&self) -> Option<GgmlDType> {
        match &self.weight {
            Weight::Quantized(q) => Some(q.dtype()),
            Weight::Interleaved(w) => Some(w.dtype()),
            Weight::Dense { .. } => None,
        }
    }

    /// The quantized weight in the checkpoint's layout, when the projection has one.
    pub fn quantized_weight(&self) -> Result<Option<Arc<QTensor>>> {
        self.block_rows()
    }

    /// Output features.
    pub fn out_dim(&self) -> Result<usize> {
        match &self.weight {
            Weight::Dense { weight, .. } => weight.dim(0),
            Weight::Quantized(q) => Ok(q.shape().dims2()?.0),
            Weight::Interleaved(w) => Ok(w.shape().0),
        }
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// One projection onto the output features of `parts` in turn: their weights stacked
    /// row-wise (block rows of quantized ones, bytes as they are), as one matmul serves in a
    /// single pass over the input what `parts` serve in several. Every output feature keeps
    /// the bits its part gives it, since both row kernels compute each output row alone.
    ///
    /// `None` where the parts cannot be stacked: a weight of a training variable (the optimizer
    /// updates the parts), a weight of another type or input width, a bias on some parts only,
    /// or parts laid out differently.
    pub fn concat(parts: &[&Linear]) -> Result<Option<Self>> {
        let Some(first) = parts.first() else {
            return Ok(None);
        };
        let biases = parts.iter().filter(|p| p.bias.is_some()).count();
        if biases != 0 && biases != parts.len() {
            return Ok(None);
        }
        let bias = if biases == 0 {
            None
        } else {
            let b: Vec<&Tensor> = parts.iter().filter_map(|p| p.bias.as_ref()).collect();
            Some(Tensor::cat(&b, 0)?)
        };
        match &first.weight {
            Weight::Dense {
                weight: w0, rows, ..
            } => {
                let (dtype, in_dim) = (w0.dtype(), w0.dim(1)?);
                let mut weights = Vec::with_capacity(parts.len());
                for p in parts {
                    match &p.weight {
                        Weight::Dense {
                            weight,
                            weight_t,
                            rows: r,
                        } if r == rows
                            && !weight.track_op()
                            && (*rows || weight_t.is_some())
                            && weight.dtype() == dtype
                            && weight.dim(1)? == in_dim =>
                        {
                            weights.push(weight.clone())
                        }
                        _ => return Ok(None),
                    }
                }
                let weight = Tensor::cat(&weights, 0)?;
                Ok(Some(if *rows {
                    Self::decoding(weight, bias)?
                } else {
                    Self::from_weights(weight, bias)?
                }))
            }
            Weight::Quantized(_) | Weight::Interleaved(_) => {
                let Some(q0) = first.block_rows()? else {
                    return Ok(None);
                };
                let cols = q0.shape().dims2()?.1;
                let mut bytes = Vec::new();
                let mut rows = 0;
                for p in parts {
                    let (Weight::Quantized(_) | Weight::Interleaved(_), Some(q)) =
                        (&p.weight, p.block_rows()?)
                    else {
                        return Ok(None);
                    };
                    let (r, c) = q.shape().dims2()?;
                    if q.dtype() != q0.dtype() || c != cols || !q.device().same_device(&q0.device())
                    {
                        return Ok(None);
                    }
                    bytes.extend_from_slice(&q.data()?);
                    rows += r;
                }
                let storage =
                    QStorage::from_data(std::borrow::Cow::Owned(bytes), &q0.device(), q0.dtype())?;
                Ok(Some(Self::quantized(
                    Arc::new(QTensor::new(storage, (rows, cols))?),
                    bias,
                )?))
            }
        }
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
            Weight::Interleaved(w) => match w.first_rows(n) {
                Some(kept) => Ok(Self {
                    weight: Weight::Interleaved(Arc::new(kept)),
                    bias,
                }),
                None => candle_core::bail!("cannot keep {n} of the {out} output features"),
            },
            Weight::Quantized(q) => {
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
            Weight::Interleaved(w) => {
                let xs = x2.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let mut out = vec![0f32; rows * w.shape().0];
                w.matmul(&xs, rows, &mut out);
                Tensor::from_vec(out, (rows, w.shape().0), x2.device())?.to_dtype(x2.dtype())?
            }
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
/// outside a training graph (neither `x` nor `w` tracked: the kernel has no backward); `None`
/// where the GEMM serves instead.
fn cpu_f32_forward(
    w: &Tensor,
    n: usize,
    x: &Tensor,
    kernel: DenseKernel,
) -> Result<Option<Tensor>> {
    use candle_core::{CpuStorage, DType, Storage};
    let (m, k) = x.dims2()?;
    let untracked = !(x.track_op() || w.track_op());
    if !(x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 && untracked) {
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

    /// Stacked projections give every output feature the bits of its own part, for decoding
    /// (f32 rows), GEMM-served and quantized weights, with and without biases, for 1 to 9 input
    /// rows; variables and parts of mixed kinds are not stacked.
    #[test]
    fn concatenated_projections_keep_every_outputs_bits() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let dev = Device::Cpu;
        let outs = [64usize, 32, 96];
        let weights: Vec<Tensor> = outs
            .iter()
            .map(|&o| Tensor::randn(0f32, 1.0, (o, 64), &dev).unwrap())
            .collect();
        let biases: Vec<Tensor> = outs
            .iter()
            .map(|&o| Tensor::randn(0f32, 1.0, o, &dev).unwrap())
            .collect();
        type Make = fn(&Tensor, Option<Tensor>) -> Linear;
        let kinds: [(&str, Make); 4] = [
            ("decoding", |w, b| Linear::decoding(w.clone(), b).unwrap()),
            ("gemm", |w, b| Linear::from_weights(w.clone(), b).unwrap()),
            ("q8_0", |w, b| {
                let q = QTensor::quantize(w, GgmlDType::Q8_0).unwrap();
                Linear::quantized(Arc::new(q), b).unwrap()
            }),
            ("q4_1", |w, b| {
                let q = QTensor::quantize(w, GgmlDType::Q4_1).unwrap();
                Linear::quantized(Arc::new(q), b).unwrap()
            }),
        ];
        for (name, make) in kinds {
            for with_bias in [false, true] {
                let parts: Vec<Linear> = weights
                    .iter()
                    .zip(&biases)
                    .map(|(w, b)| make(w, with_bias.then(|| b.clone())))
                    .collect();
                let refs: Vec<&Linear> = parts.iter().collect();
                let stacked = Linear::concat(&refs).unwrap().expect(name);
                assert_eq!(stacked.out_dim().unwrap(), 192);
                for m in [1usize, 2, 5, 9] {
                    let x = Tensor::randn(0f32, 1.0, (1, m, 64), &dev).unwrap();
                    let apart: Vec<Tensor> = parts.iter().map(|p| p.forward(&x).unwrap()).collect();
                    let want = Tensor::cat(&apart, 2).unwrap().flatten_all().unwrap();
                    let got = stacked.forward(&x).unwrap().flatten_all().unwrap();
                    let (want, got) = (
                        want.to_vec1::<f32>().unwrap(),
                        got.to_vec1::<f32>().unwrap(),
                    );
                    let same = want
                        .iter()
                        .zip(&got)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{name}, bias {with_bias}, {m} rows");
                }
            }
        }
        let var = Var::from_tensor(&weights[0]).unwrap();
        let trained = Linear::from_weights(var.as_tensor().clone(), None).unwrap();
        let plain = Linear::from_weights(weights[1].clone(), None).unwrap();
        assert!(Linear::concat(&[&trained, &plain]).unwrap().is_none());
        let decoding = Linear::decoding(weights[1].clone(), None).unwrap();
        assert!(Linear::concat(&[&plain, &decoding]).unwrap().is_none());
        let with_bias = Linear::from_weights(weights[1].clone(), Some(biases[1].clone())).unwrap();
        assert!(Linear::concat(&[&plain, &with_bias]).unwrap().is_none());
        let narrow = Linear::from_weights(weights[1].narrow(1, 0, 32).unwrap(), None).unwrap();
        assert!(Linear::concat(&[&plain, &narrow]).unwrap().is_none());
    }
}
