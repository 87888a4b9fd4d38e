//! ViT input embeddings (Dosovitskiy et al. 2021, eq. 1): split the image into `P×P` patches,
//! project each linearly, optionally prepend a class token, add learned position embeddings.
//! Images of another size than the checkpoint's get the position table resized bicubically, as
//! HF's `interpolate_pos_encoding=True` does.
//!
//! The patch projection is a reshape plus one matmul rather than a strided conv2d: the two are
//! the same function, and the matmul is faster and has a trustworthy backward in Candle
//! (CANDLE_NOTES.md). The weight keeps the conv layout `[D, C, P, P]` of the checkpoint.

use candle_core::{Result, Tensor, D};
use candle_nn::VarBuilder;

use super::resample::{interpolate, Interpolation};

/// How a checkpoint stores the class token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassToken {
    /// No class token (SigLIP).
    None,
    /// `class_embedding` of shape `[D]` (CLIP).
    Vector,
    /// `class_embedding` of shape `[1, 1, D]` (BLIP).
    Parameter,
}

/// How a checkpoint stores the learned position embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PositionTable {
    /// An `nn.Embedding`: `position_embedding.weight` `[N, D]` (CLIP, SigLIP).
    Embedding,
    /// A bare parameter: `position_embedding` `[1, N, D]` (BLIP).
    Parameter,
}

#[derive(Debug, Clone)]
pub struct VitEmbeddingsConfig {
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_size: usize,
    pub patch_bias: bool,
    pub class_token: ClassToken,
    pub position_table: PositionTable,
}

impl VitEmbeddingsConfig {
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }

    pub fn num_positions(&self) -> usize {
        self.num_patches() + usize::from(self.class_token != ClassToken::None)
    }
}

/// Patch embedding (conv-layout weight, optional bias) as a matmul over flattened patches.
#[derive(Debug, Clone)]
pub struct PatchEmbedding {
    /// `[C·P·P, D]`, the conv weight flattened and transposed once at load.
    weight: Tensor,
    bias: Option<Tensor>,
    patch_size: usize,
}

impl PatchEmbedding {
    pub fn new(
        num_channels: usize,
        hidden: usize,
        patch_size: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let w = vb.get((hidden, num_channels, patch_size, patch_size), "weight")?;
        let weight = w.flatten_from(1)?.t()?;
        let bias = if bias {
            Some(vb.get(hidden, "bias")?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            patch_size,
        })
    }

    /// `[B, C, H, W]` → `[B, (H/P)·(W/P), D]`, patches in row-major order as conv2d + flatten
    /// gives them. Trailing pixels that do not fill a patch are dropped, as a stride-P conv does.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixel_values.dims4()?;
        let p = self.patch_size;
        let (gh, gw) = (h / p, w / p);
        let x = pixel_values.narrow(2, 0, gh * p)?.narrow(3, 0, gw * p)?;
        let patches = x
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * gh * gw, c * p * p))?;
        let y = patches.matmul(&self.weight.to_dtype(patches.dtype())?)?;
        let y = match &self.bias {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        };
        y.reshape((b, gh * gw, ()))
    }
}

/// Patch embedding + optional class token + learned absolute position embedding.
#[derive(Debug, Clone)]
pub struct VitEmbeddings {
    /// `[D]` whatever the checkpoint's layout.
    class_embedding: Option<Tensor>,
    patch_embedding: PatchEmbedding,
    /// `[N, D]` whatever the checkpoint's layout.
    position_embedding: Tensor,
}

impl VitEmbeddings {
    pub fn new(cfg: &VitEmbeddingsConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let class_embedding = match cfg.class_token {
            ClassToken::None => None,
            ClassToken::Vector => Some(vb.get(d, "class_embedding")?),
            ClassToken::Parameter => Some(vb.get((1, 1, d), "class_embedding")?.reshape(d)?),
        };
        let patch_embedding = PatchEmbedding::new(
            cfg.num_channels,
            d,
            cfg.patch_size,
            cfg.patch_bias,
            vb.pp("patch_embedding"),
        )?;
        let n = cfg.num_positions();
        let position_embedding = match cfg.position_table {
            PositionTable::Embedding => vb.pp("position_embedding").get((n, d), "weight")?,
            PositionTable::Parameter => vb.get((1, n, d), "position_embedding")?.reshape((n, d))?,
        };
        Ok(Self {
            class_embedding,
            patch_embedding,
            position_embedding,
        })
    }

    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let patches = self.patch_embedding.forward(pixel_values)?;
        let (b, _, d) = patches.dims3()?;
        let tokens = match &self.class_embedding {
            Some(cls) => {
                let cls = cls.reshape((1, 1, d))?.broadcast_as((b, 1, d))?;
                Tensor::cat(&[&cls.to_dtype(patches.dtype())?, &patches], 1)?
            }
            None => patches,
        };
        let (_, _, h, w) = pixel_values.dims4()?;
        let p = self.patch_embedding.patch_size;
        let positions = self.positions_for_grid(h / p, w / p)?;
        tokens.broadcast_add(&positions.to_dtype(tokens.dtype())?.unsqueeze(0)?)
    }

    /// The position table for a `rows × cols` patch grid: the learned one for its own square
    /// grid, else its patch part resized bicubically (`align_corners = False`), the class
    /// position kept, as HF's `interpolate_pos_encoding=True` does; differentiable.
    pub fn positions_for_grid(&self, rows: usize, cols: usize) -> Result<Tensor> {
        let table = &self.position_embedding;
        let (n, d) = table.dims2()?;
        let class = usize::from(self.class_embedding.is_some());
        let side = ((n - class) as f64).sqrt().round() as usize;
        if rows == side && cols == side {
            return Ok(table.clone());
        }
        if side * side != n - class {
            candle_core::bail!(
                "the position table has {} patch positions, not a square grid, so it cannot be \
                 resized to {rows}×{cols} patches",
                n - class
            );
        }
        if rows == 0 || cols == 0 {
            candle_core::bail!("the image is smaller than one patch");
        }
        let grid = table
            .narrow(0, class, n - class)?
            .reshape((1, side, side, d))?
            .permute((0, 3, 1, 2))?;
        let resized = interpolate(
            &grid,
            rows,
            cols,
            Interpolation::Bicubic {
                align_corners: false,
            },
        )?
        .permute((0, 2, 3, 1))?
        .reshape((rows * cols, d))?;
        if class == 0 {
            Ok(resized)
        } else {
            Tensor::cat(&[&table.narrow(0, 0, class)?, &resized], 0)
        }
    }

    /// The model width `D`.
    pub fn hidden_size(&self) -> Result<usize> {
        self.position_embedding.dim(D::Minus1)
    }
}
