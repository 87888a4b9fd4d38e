//! torchvision's `ImageFolder` layout: `root/<class name>/**/<image>`, the usual shape of
//! zero-shot classification sets (ImageNet validation, for one).

use std::path::{Path, PathBuf};

use super::{invalid, io_error};
use crate::Result;

/// Extensions counted as images (compared case-insensitively): torchvision's
/// `IMG_EXTENSIONS` that the `image` crate decodes with our features, plus gif.
const IMAGE_EXTENSIONS: [&str; 8] = ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"];

/// Images labelled by the folder they sit in.
///
/// Labels match torchvision's: classes are the sorted names of `root`'s subfolders, and a
/// class's label is its index in that list, so a classifier built from
/// [`ImageFolder::class_names`] lines up with checkpoints evaluated in PyTorch.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    root: PathBuf,
    class_names: Vec<String>,
    samples: Vec<(PathBuf, usize)>,
}

impl ImageFolder {
    /// Lists the classes and their images (searching each class folder recursively, following
    /// symlinks), sorted by class and then by path. Other files are ignored.
    ///
    /// Fails, naming the folder, if `root` cannot be read, has no subfolders, or a class
    /// folder holds no images (torchvision refuses empty classes too: their labels would
    /// silently never occur).
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref();
        let mut class_names = Vec::new();
        for dir in read_dir(root)? {
            if dir.is_dir() {
                let name = dir.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
                    invalid(&dir, "class folder", "its name is not UTF-8".to_string())
                })?;
                class_names.push(name.to_string());
            }
        }
        if class_names.is_empty() {
            return Err(invalid(
                root,
                "image folder",
                "it has no class subfolders".to_string(),
            ));
        }
        class_names.sort();

        let mut samples = Vec::new();
        for (label, class) in class_names.iter().enumerate() {
            let class_dir = root.join(class);
            let mut images = Vec::new();
            collect_images(&class_dir, &mut images)?;
            if images.is_empty() {
                return Err(invalid(
                    &class_dir,
                    "class folder",
                    format!(
                        "it holds no images (looked for {})",
                        IMAGE_EXTENSIONS.join(", ")
                    ),
                ));
            }
            images.sort();
            samples.extend(images.into_iter().map(|path| (path, label)));
        }
        Ok(Self {
            root: root.to_path_buf(),
            class_names,
            samples,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Class names in label order.
    pub fn class_names(&self) -> &[String] {
        &self.class_names
    }

    /// Every `(image path, label)`, sorted by class and then by path.
    pub fn samples(&self) -> &[(PathBuf, usize)] {
        &self.samples
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Always false for an opened folder, which has at least one image per class.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

impl IntoIterator for ImageFolder {
    type Item = (PathBuf, usize);
    type IntoIter = std::vec::IntoIter<(PathBuf, usize)>;

    fn into_iter(self) -> Self::IntoIter {
        self.samples.into_iter()
    }
}

fn collect_images(dir: &Path, images: &mut Vec<PathBuf>) -> Result<()> {
    for path in read_dir(dir)? {
        if path.is_dir() {
            collect_images(&path, images)?;
        } else if has_image_extension(&path) {
            images.push(path);
        }
    }
    Ok(())
}

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

fn read_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::read_dir(dir)
        .map_err(io_error(dir))?
        .map(|entry| entry.map(|e| e.path()).map_err(io_error(dir)))
        .collect()
}
