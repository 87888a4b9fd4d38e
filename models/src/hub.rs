//! Finding a checkpoint's files: a local folder in HF layout, or a hub id `org/name[@revision]`
//! fetched through hf-hub.
//!
//! The hub cache is the one `huggingface_hub` uses (`$HF_HOME/hub`, default
//! `~/.cache/huggingface/hub`), so models downloaded by Python are found here too. With
//! `HF_HUB_OFFLINE=1` nothing touches the network: files come from that cache or fail with an
//! error that says so.

use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// Where a model comes from, as written on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Local(PathBuf),
    Hub {
        repo_id: String,
        revision: Option<String>,
    },
}

impl ModelSource {
    /// An existing path is a local folder; otherwise `org/name` or `org/name@rev` is a hub id;
    /// anything else is taken as a (missing) local folder so the error names it.
    pub fn parse(spec: &str) -> Self {
        let path = Path::new(spec);
        if path.exists() {
            return Self::Local(path.to_path_buf());
        }
        let (id, revision) = match spec.split_once('@') {
            Some((id, rev)) if !rev.is_empty() => (id, Some(rev.to_string())),
            _ => (spec, None),
        };
        let valid_part = |s: &str| {
            !s.is_empty()
                && !s.starts_with('.')
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        match id.split('/').collect::<Vec<_>>().as_slice() {
            [org, name] if valid_part(org) && valid_part(name) => Self::Hub {
                repo_id: id.to_string(),
                revision,
            },
            _ => Self::Local(path.to_path_buf()),
        }
    }
}

/// `HF_HUB_OFFLINE` as `huggingface_hub` reads it.
pub fn hub_offline_from_env() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

/// An opened model location from which named files can be fetched.
pub struct ModelRepo {
    kind: RepoKind,
}

enum RepoKind {
    Local(PathBuf),
    Hub {
        repo: Repo,
        /// `org/name@revision`, for messages.
        label: String,
        cache: Cache,
        offline: bool,
    },
}

impl ModelRepo {
    /// Opens `spec`, reading `HF_HOME` and `HF_HUB_OFFLINE` from the environment.
    pub fn open(spec: &str) -> Result<Self> {
        Self::open_with(spec, Cache::from_env(), hub_offline_from_env())
    }

    /// Opens `spec` against an explicit hub cache folder (the `hub/` folder under `HF_HOME`).
    pub fn open_with(spec: &str, cache: Cache, offline: bool) -> Result<Self> {
        match ModelSource::parse(spec) {
            ModelSource::Local(dir) => {
                if !dir.is_dir() {
                    return Err(Error::MissingFolder(dir));
                }
                Ok(Self {
                    kind: RepoKind::Local(dir),
                })
            }
            ModelSource::Hub { repo_id, revision } => {
                let revision = revision.unwrap_or_else(|| "main".to_string());
                let label = format!("{repo_id}@{revision}");
                let repo = Repo::with_revision(repo_id, RepoType::Model, revision);
                Ok(Self {
                    kind: RepoKind::Hub {
                        repo,
                        label,
                        cache,
                        offline,
                    },
                })
            }
        }
    }

    /// The folder or hub id, for messages.
    pub fn describe(&self) -> String {
        match &self.kind {
            RepoKind::Local(dir) => dir.display().to_string(),
            RepoKind::Hub { label, .. } => label.clone(),
        }
    }

    /// The path of `file`, downloading it first when it comes from the hub and is not cached.
    pub fn get(&self, file: &str) -> Result<PathBuf> {
        self.get_optional(file)?.ok_or_else(|| Error::MissingFile {
            folder: self.describe(),
            file: file.to_string(),
        })
    }

    /// Like [`get`](Self::get), but a file the model does not have is `Ok(None)`.
    pub fn get_optional(&self, file: &str) -> Result<Option<PathBuf>> {
        match &self.kind {
            RepoKind::Local(dir) => {
                let path = dir.join(file);
                Ok(path.is_file().then_some(path))
            }
            RepoKind::Hub {
                repo,
                cache,
                offline,
                ..
            } => {
                if let Some(path) = cached_file(cache, repo, file) {
                    return Ok(Some(path));
                }
                if *offline {
                    return Ok(None);
                }
                let api = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
                    .with_progress(true)
                    .build()
                    .map_err(|e| Error::Hub(format!("cannot start the hub client: {e}")))?;
                match api.repo(repo.clone()).get(file) {
                    Ok(path) => Ok(Some(path)),
                    Err(hf_hub::api::sync::ApiError::RequestError(e))
                        if matches!(*e, ureq::Error::Status(404, _)) =>
                    {
                        Ok(None)
                    }
                    Err(e) => Err(Error::Hub(format!(
                        "cannot download {file} of {}: {e} (set HF_HUB_OFFLINE=1 to use only the local cache)",
                        self.describe()
                    ))),
                }
            }
        }
    }

    /// The safetensors files holding the weights: the shards listed by
    /// `model.safetensors.index.json`, or `model.safetensors`.
    pub fn weight_files(&self) -> Result<Vec<PathBuf>> {
        if let Some(index) = self.get_optional("model.safetensors.index.json")? {
            let parsed: ShardIndex = read_json(&index, "safetensors index")?;
            let mut shards: Vec<&String> = parsed.weight_map.values().collect();
            shards.sort();
            shards.dedup();
            if shards.is_empty() {
                return Err(Error::Invalid {
                    path: index,
                    what: "safetensors index",
                    message: "its weight_map is empty".into(),
                });
            }
            return shards.into_iter().map(|s| self.get(s)).collect();
        }
        match self.get_optional("model.safetensors")? {
            Some(path) => Ok(vec![path]),
            None => Err(Error::MissingFile {
                folder: self.describe(),
                file: "model.safetensors (or model.safetensors.index.json)".into(),
            }),
        }
    }
}

/// A file of `repo` in the local hub cache, if present. A full commit hash as revision is looked
/// up in `snapshots/` directly, as `huggingface_hub` stores it without a ref.
fn cached_file(cache: &Cache, repo: &Repo, file: &str) -> Option<PathBuf> {
    let rev = repo.revision();
    if rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit()) {
        let path = cache
            .path()
            .join(repo.folder_name())
            .join("snapshots")
            .join(rev)
            .join(file);
        return path.is_file().then_some(path);
    }
    cache.repo(repo.clone()).get(file)
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: std::collections::HashMap<String, String>,
}

/// Reads and deserialises a JSON file; errors name the file and serde's line and column.
pub fn read_json<T: DeserializeOwned>(path: &Path, what: &'static str) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Invalid {
        path: path.to_path_buf(),
        what,
        message: e.to_string(),
    })
}
