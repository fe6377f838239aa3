//! `ModelRegistry`: resolves a base model name (`SmolLM2-135M-Instruct`,
//! `HuggingFaceTB/SmolLM2-135M-Instruct`) to a model folder on disk, offline.
//!
//! It searches, in order:
//! 1. models folders: `$INFERMUX_MODELS_DIR` (a path list), else the nearest `models/` folder
//!    in the working directory or one of its parents, plus any added with
//!    [`ModelRegistry::with_models_dir`]. A model is `DIR/NAME/`, `DIR/ORG/NAME/` or a
//!    Hugging Face cache entry `DIR/models--ORG--NAME/`;
//! 2. Hugging Face hub caches: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//!    `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`, holding
//!    `models--ORG--NAME/snapshots/<revision>/` (the revision `refs/main` names, else the newest).
//!
//! A folder counts as a model when it holds `config.json`. Names match exactly first, then by
//! their last segment (so `NAME` finds `ORG/NAME` and back), then ignoring case; an unknown or
//! ambiguous name is a [`RegistryError`] that lists what is available.

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

/// The environment variable naming the models folders (a `PATH`-style list).
pub const MODELS_DIR_ENV: &str = "INFERMUX_MODELS_DIR";

/// Why a base model name could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// No model of that name is on disk.
    #[error(
        "unknown base model {name:?}: {}; searched {}",
        available_text(available),
        paths_text(searched)
    )]
    UnknownModel {
        /// The name asked for.
        name: String,
        /// Names that would resolve.
        available: Vec<String>,
        /// Folders searched.
        searched: Vec<PathBuf>,
    },
    /// Several models match the name; qualify it with its organization.
    #[error("base model {name:?} is ambiguous: it matches {}", candidates.join(", "))]
    Ambiguous {
        /// The name asked for.
        name: String,
        /// The matching names.
        candidates: Vec<String>,
    },
    /// The name is not `NAME` or `ORG/NAME`.
    #[error("invalid base model name {name:?}: expected NAME or ORG/NAME")]
    InvalidName {
        /// The name given.
        name: String,
    },
}

fn available_text(available: &[String]) -> String {
    if available.is_empty() {
        format!(
            "no model is available (put model folders in a models folder, set {MODELS_DIR_ENV}, \
             or fill the Hugging Face cache)"
        )
    } else {
        format!("available: {}", available.join(", "))
    }
}

fn paths_text(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return "nothing".into();
    }
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Carried by [`Error`] as a model error until the façade's error enum has a variant of its own.
/// Where a registered model was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelLocation {
    /// A models folder.
    ModelsDir,
    /// A Hugging Face hub cache.
    HfCache,
}

/// One model the registry can resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredModel {
    /// `NAME` or `ORG/NAME`.
    pub name: String,
    /// The model folder (a snapshot folder for cache entries).
    pub path: PathBuf,
    /// Where it was found.
    pub location: ModelLocation,
}

/// Resolves base model names to model folders. Cheap to clone; reads the disk on each lookup,
/// so models added later are found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRegistry {
    models_dirs: Vec<PathBuf>,
    hf_caches: Vec<PathBuf>,
}

impl Default for ModelRegistry {
    /// [`ModelRegistry::from_env`].
    fn default() -> Self {
        Self::from_env()
    }
}

impl ModelRegistry {
    /// The registry the environment describes (see the module docs).
    pub fn from_env() -> Self {
        let cwd = std::env::current_dir().ok();
        Self::from_lookup(|k| std::env::var_os(k), cwd.as_deref())
    }

    /// A registry that searches nothing until folders are added.
    pub fn empty() -> Self {
        Self {
            models_dirs: Vec::new(),
            hf_caches: Vec::new(),
        }
    }

    fn from_lookup(var: impl Fn(&str) -> Option<OsString>, cwd: Option<&Path>) -> Self {
        let set = |k: &str| var(k).filter(|v| !v.is_empty());
        let models_dirs = match set(MODELS_DIR_ENV) {
            Some(list) => std::env::split_paths(&list).collect(),
            None => cwd.map(default_models_dir).into_iter().collect(),
        };
        let hf_cache = set("HF_HUB_CACHE")
            .map(PathBuf::from)
            .or_else(|| set("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
            .or_else(|| {
                set("XDG_CACHE_HOME").map(|c| PathBuf::from(c).join("huggingface").join("hub"))
            })
            .or_else(|| set("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub")));
        Self {
            models_dirs,
            hf_caches: hf_cache.into_iter().collect(),
        }
    }

    /// Searches `dir` as a models folder, before every folder already known.
    pub fn with_models_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.models_dirs.insert(0, dir.into());
        self
    }

    /// Searches `hub` (a folder of `models--ORG--NAME` entries) as a Hugging Face cache, before
    /// every cache already known.
    pub fn with_hf_cache(mut self, hub: impl Into<PathBuf>) -> Self {
        self.hf_caches.insert(0, hub.into());
        self
    }

    /// The models folders searched, in order.
    pub fn models_dirs(&self) -> &[PathBuf] {
        &self.models_dirs
    }

    /// The Hugging Face caches searched, in order (after the models folders).
    pub fn hf_caches(&self) -> &[PathBuf] {
        &self.hf_caches
    }

    /// Every model found, in search order (a name found twice is listed once, where it is
    /// found first).
    pub fn list(&self) -> Vec<RegisteredModel> {
        let mut out: Vec<RegisteredModel> = Vec::new();
        let mut push = |m: RegisteredModel| {
            if !out.iter().any(|o| o.name == m.name) {
                out.push(m);
            }
        };
        for dir in &self.models_dirs {
            for entry in sorted_subdirs(dir) {
                let file_name = entry.file_name().unwrap_or_default().to_string_lossy();
                if let Some(name) = cache_entry_name(&file_name) {
                    if let Some(path) = snapshot_of(&entry) {
                        push(model(name, path, ModelLocation::ModelsDir));
                    }
                } else if is_model_dir(&entry) {
                    push(model(
                        file_name.into_owned(),
                        entry,
                        ModelLocation::ModelsDir,
                    ));
                } else {
                    for child in sorted_subdirs(&entry) {
                        if is_model_dir(&child) {
                            let child_name = child.file_name().unwrap_or_default();
                            let name = format!("{file_name}/{}", child_name.to_string_lossy());
                            push(model(name, child, ModelLocation::ModelsDir));
                        }
                    }
                }
            }
        }
        for hub in &self.hf_caches {
            for entry in sorted_subdirs(hub) {
                let file_name = entry.file_name().unwrap_or_default().to_string_lossy();
                if let Some(name) = cache_entry_name(&file_name)
                    && let Some(path) = snapshot_of(&entry)
                {
                    push(model(name, path, ModelLocation::HfCache));
                }
            }
        }
        out
    }

    /// The folder of the model called `name`.
    pub fn resolve(&self, name: &str) -> Result<PathBuf, RegistryError> {
        self.lookup(name).map(|m| m.path)
    }

    /// The model called `name`, with where it was found.
    pub fn lookup(&self, name: &str) -> Result<RegisteredModel, RegistryError> {
        let name = name.trim();
        let invalid = || RegistryError::InvalidName {
            name: name.to_string(),
        };
        let segments: Vec<&str> = name.split('/').collect();
        if name.is_empty()
            || segments.len() > 2
            || Path::new(name)
                .components()
                .any(|c| !matches!(c, Component::Normal(_)))
            || segments.iter().any(|s| s.is_empty())
        {
            return Err(invalid());
        }
        let models = self.list();
        let last = |n: &str| n.rsplit('/').next().unwrap_or(n).to_string();
        let want_last = last(name);
        type Rule<'a> = Box<dyn Fn(&RegisteredModel) -> bool + 'a>;
        let rules: [Rule; 4] = [
            Box::new(|m| m.name == name),
            Box::new(|m| last(&m.name) == want_last && (m.name == want_last || want_last == name)),
            Box::new(|m| m.name.eq_ignore_ascii_case(name)),
            Box::new(|m| {
                last(&m.name).eq_ignore_ascii_case(&want_last)
                    && (m.name.eq_ignore_ascii_case(&want_last) || want_last == name)
            }),
        ];
        for rule in rules {
            let hits: Vec<&RegisteredModel> = models.iter().filter(|m| rule(m)).collect();
            match hits.as_slice() {
                [] => continue,
                [one] => return Ok((*one).clone()),
                many => {
                    // The same folder reached twice is not ambiguous; the first place wins.
                    if many.iter().all(|m| m.path == many[0].path) {
                        return Ok(many[0].clone());
                    }
                    return Err(RegistryError::Ambiguous {
                        name: name.to_string(),
                        candidates: many
                            .iter()
                            .map(|m| format!("{} ({})", m.name, m.path.display()))
                            .collect(),
                    });
                }
            }
        }
        Err(RegistryError::UnknownModel {
            name: name.to_string(),
            available: models.into_iter().map(|m| m.name).collect(),
            searched: self
                .models_dirs
                .iter()
                .chain(&self.hf_caches)
                .cloned()
                .collect(),
        })
    }
}

fn model(name: String, path: PathBuf, location: ModelLocation) -> RegisteredModel {
    RegisteredModel {
        name,
        path,
        location,
    }
}

/// `cwd/models`, else the nearest parent's `models/`, else `cwd/models` (searched, absent).
fn default_models_dir(cwd: &Path) -> PathBuf {
    cwd.ancestors()
        .map(|d| d.join("models"))
        .find(|d| d.is_dir())
        .unwrap_or_else(|| cwd.join("models"))
}

fn is_model_dir(dir: &Path) -> bool {
    dir.join("config.json").is_file()
}

/// Subfolders (or links to folders) of `dir`, by name; nothing if it cannot be read.
fn sorted_subdirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    dirs.sort();
    dirs
}

/// `models--ORG--NAME` → `ORG/NAME` (`models--NAME` → `NAME`).
fn cache_entry_name(file_name: &str) -> Option<String> {
    let rest = file_name.strip_prefix("models--")?;
    if rest.is_empty() {
        return None;
    }
    Some(match rest.split_once("--") {
        Some((org, name)) if !org.is_empty() && !name.is_empty() => format!("{org}/{name}"),
        _ => rest.to_string(),
    })
}

/// The snapshot of a cache entry to use: the one `refs/main` names, else the most recently
/// modified one holding a model.
fn snapshot_of(entry: &Path) -> Option<PathBuf> {
    let snapshots = entry.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(entry.join("refs").join("main")) {
        let dir = snapshots.join(rev.trim());
        if !rev.trim().is_empty() && is_model_dir(&dir) {
            return Some(dir);
        }
    }
    sorted_subdirs(&snapshots)
        .into_iter()
        .filter(|d| is_model_dir(d))
        .max_by_key(|d| {
            std::fs::metadata(d.join("config.json"))
                .and_then(|m| m.modified())
                .ok()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_lookup_order() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        let cwd = Path::new("/nonexistent/work");
        let r = ModelRegistry::from_lookup(
            env(&[
                (MODELS_DIR_ENV, "/a:/b"),
                ("HF_HOME", "/hf"),
                ("HOME", "/home/u"),
            ]),
            Some(cwd),
        );
        assert_eq!(r.models_dirs(), [PathBuf::from("/a"), PathBuf::from("/b")]);
        assert_eq!(r.hf_caches(), [PathBuf::from("/hf/hub")]);

        let r = ModelRegistry::from_lookup(
            env(&[("HF_HUB_CACHE", "/cache"), ("HF_HOME", "/hf")]),
            Some(cwd),
        );
        assert_eq!(r.models_dirs(), [cwd.join("models")]);
        assert_eq!(r.hf_caches(), [PathBuf::from("/cache")]);

        let r = ModelRegistry::from_lookup(env(&[("HOME", "/home/u")]), None);
        assert!(r.models_dirs().is_empty());
        assert_eq!(
            r.hf_caches(),
            [PathBuf::from("/home/u/.cache/huggingface/hub")]
        );
    }

    #[test]
    fn cache_entry_names() {
        assert_eq!(
            cache_entry_name("models--HuggingFaceTB--SmolLM2-135M").as_deref(),
            Some("HuggingFaceTB/SmolLM2-135M")
        );
        assert_eq!(cache_entry_name("models--gpt2").as_deref(), Some("gpt2"));
        assert_eq!(cache_entry_name("datasets--x--y"), None);
        assert_eq!(cache_entry_name("models--"), None);
    }

    #[test]
    fn invalid_names_are_rejected_before_touching_the_disk() {
        let r = ModelRegistry::empty();
        for bad in ["", "../x", "a/b/c", "/abs", "a//b", "./a", "a/.."] {
            assert!(
                matches!(r.resolve(bad), Err(RegistryError::InvalidName { .. })),
                "{bad:?}"
            );
        }
    }
}
