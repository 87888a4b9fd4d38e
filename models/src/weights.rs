//! Memory-mapped safetensors weights, single-file or sharded, behind a `VarBuilder`.
//!
//! Candle's own mmapped backend reports a missing tensor or a wrong shape without saying which
//! file was read; this one names the tensor, the file and both shapes, and validates every file's
//! header and length when it is opened, so a truncated download fails at load, not mid-forward.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use memmap2::Mmap;
use safetensors::SafeTensors;

use crate::error::{Error, Result};

/// Opened, validated safetensors files and where each tensor lives.
pub struct SafetensorsWeights {
    files: Vec<(PathBuf, Mmap)>,
    routing: HashMap<String, usize>,
}

impl SafetensorsWeights {
    /// Maps every file and indexes its tensors. Files are validated (header, offsets, length).
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut routing = HashMap::new();
        for (index, path) in paths.iter().enumerate() {
            let file = std::fs::File::open(path).map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            // SAFETY: the mapping is read-only; like every mmap-based loader we rely on the file
            // not being truncated by another process while the model is alive.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| Error::Invalid {
                path: path.clone(),
                what: "safetensors file",
                message: describe_safetensors_error(&e),
            })?;
            for name in st.names() {
                routing.insert(name.to_string(), index);
            }
            drop(st);
            files.push((path.clone(), mmap));
        }
        Ok(Self { files, routing })
    }

    /// A `VarBuilder` reading from these files, casting to `dtype` on `device`.
    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.routing.keys().cloned().collect();
        names.sort();
        names
    }

    /// The stored dtype of the first floating-point tensor, if any.
    pub fn stored_float_dtype(&self) -> Option<DType> {
        self.names().iter().find_map(|n| {
            let t = self.load(n, &Device::Cpu).ok()?;
            t.dtype().is_float().then(|| t.dtype())
        })
    }

    fn location(&self) -> String {
        match self.files.as_slice() {
            [(p, _)] => p.display().to_string(),
            files => format!(
                "the {} shards in {}",
                files.len(),
                files[0].0.parent().unwrap_or(Path::new(".")).display()
            ),
        }
    }

    fn load(&self, name: &str, dev: &Device) -> candle_core::Result<Tensor> {
        let Some(&index) = self.routing.get(name) else {
            candle_core::bail!("tensor `{name}` is missing from {}", self.location());
        };
        let (path, mmap) = &self.files[index];
        let st = SafeTensors::deserialize(mmap)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        let view = st
            .tensor(name)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        view.load(dev).map_err(|e| {
            candle_core::Error::Msg(format!("tensor `{name}` in {}: {e}", path.display()))
        })
    }
}

impl SimpleBackend for SafetensorsWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.load(name, dev)?;
        if t.shape() != &s {
            let path = &self.files[self.routing[name]].0;
            candle_core::bail!(
                "tensor `{name}` in {} has shape {:?} but the config implies {:?}",
                path.display(),
                t.dims(),
                s.dims()
            );
        }
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.routing.contains_key(name)
    }
}

fn describe_safetensors_error(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::MetadataIncompleteBuffer | E::HeaderTooSmall | E::InvalidHeaderLength => {
            format!("the file is truncated or corrupt ({e:?})")
        }
        other => format!("{other:?}"),
    }
}

/// Writes `tensors` as a safetensors file atomically: into a temporary file in the same folder,
/// flushed to disk, then renamed over `path`, so a crash never leaves a half-written file.
pub fn save_safetensors_atomic(
    tensors: &std::collections::HashMap<String, Tensor>,
    path: &Path,
) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = candle_core::safetensors::save(tensors, &tmp)
        .map_err(|e| Error::Invalid {
            path: path.to_path_buf(),
            what: "safetensors output",
            message: e.to_string(),
        })
        .and_then(|()| {
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(io)?;
            std::fs::rename(&tmp, path).map_err(io)
        });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
