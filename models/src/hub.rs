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
            Some((id, rev)) => (id, Some(rev.to_string())),
            None => (spec, None),
        };
        if is_repo_id(id) {
            Self::Hub {
                repo_id: id.to_string(),
                revision,
            }
        } else {
            Self::Local(path.to_path_buf())
        }
    }
}

/// `huggingface_hub`'s `validate_repo_id`: `name` or `org/name`, each part of letters, digits,
/// `-`, `_` and `.`, neither starting nor ending with `-` or `.`, no `--` or `..`, 96 characters
/// at most. So no id can name a folder outside the cache.
pub fn is_repo_id(id: &str) -> bool {
    let part = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !s.starts_with(['-', '.'])
            && !s.ends_with(['-', '.'])
    };
    let parts: Vec<&str> = id.split('/').collect();
    id.len() <= 96
        && !id.contains("--")
        && !id.contains("..")
        && matches!(parts.as_slice(), [org, name] if part(org) && part(name))
}

/// A revision the hub cache can hold: a full commit hash, or a ref name as git allows it
/// (`main`, `v1.0`, `refs/pr/1`): letters, digits, `-`, `_`, `.` and `/`, no empty, `.` or
/// `..` component, nothing that starts with `.`. So no revision can reach outside the cache's
/// `refs/` and `snapshots/` folders.
pub fn is_revision(rev: &str) -> bool {
    !rev.is_empty()
        && rev.len() <= 255
        && rev
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
        && rev
            .split('/')
            .all(|part| !part.is_empty() && !part.starts_with('.') && !part.ends_with(".lock"))
}

/// Whether `name`, a file named by a checkpoint (a shard of a safetensors index, say), stays
/// inside the checkpoint's folder: relative, with no `..`, root or drive component.
pub fn is_inside_name(name: &str) -> bool {
    use std::path::Component;
    !name.is_empty()
        && Path::new(name)
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
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
                if !is_revision(&revision) {
                    return Err(Error::Hub(format!(
                        "`{revision}` in `{spec}` is not a revision: give a branch or tag name \
                         (letters, digits, - _ . /, no `..`) or a commit hash"
                    )));
                }
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
        if !is_inside_name(file) {
            return Err(Error::Hub(format!(
                "`{file}` is not a file name inside {}: it would read outside the model",
                self.describe()
            )));
        }
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
    // A ref file names the snapshot: only a commit hash is followed, whatever the file says.
    let folder = cache.path().join(repo.folder_name());
    let commit = std::fs::read_to_string(folder.join("refs").join(rev)).ok()?;
    let commit = commit.trim();
    if !(commit.len() == 40 && commit.chars().all(|c| c.is_ascii_hexdigit())) {
        return None;
    }
    let path = folder.join("snapshots").join(commit).join(file);
    path.is_file().then_some(path)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_follow_huggingface_hub() {
        for ok in ["openai/clip-vit-base-patch32", "a/b", "Org_1/name.v2"] {
            assert!(is_repo_id(ok), "{ok}");
        }
        for bad in [
            "../x", "a/../b", "a/..", "a/b/c", "/a", "a/", "a/.b", "a/b.", "a--b/c", "a/b c",
            "a\\b/c", "",
        ] {
            assert!(!is_repo_id(bad), "{bad}");
        }
        assert!(!is_repo_id(&format!("a/{}", "x".repeat(96))));
    }

    #[test]
    fn revisions_cannot_leave_the_cache() {
        for ok in ["main", "v1.0", "refs/pr/1", &"a".repeat(40)] {
            assert!(is_revision(ok), "{ok}");
        }
        for bad in [
            "", "..", "../../x", "a/../b", "/main", "main/", "a//b", ".hidden", "a b",
        ] {
            assert!(!is_revision(bad), "{bad}");
        }
    }

    #[test]
    fn hub_specs_with_bad_revisions_are_refused() {
        let cache = Cache::new(std::env::temp_dir().join("zoo-no-such-cache"));
        let err = ModelRepo::open_with("org/name@../../etc", cache, true)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("is not a revision"), "{err}");
    }

    #[test]
    fn file_names_stay_inside_the_model() {
        assert!(is_inside_name("model-00001-of-00002.safetensors"));
        assert!(is_inside_name("sub/model.safetensors"));
        for bad in ["../secret", "/etc/passwd", "a/../../b", ""] {
            assert!(!is_inside_name(bad), "{bad}");
        }
    }
}
