//! LoRA adapters served next to the base weights: loaded and unloaded at run time by name,
//! each under an [`AdapterId`] the engine never reuses. A request runs on the adapter of the
//! handle it was submitted through ([`crate::Engine::with_adapter`]); requests on different
//! adapters and on the base share forwards (the backend applies each chunk's adapter).
//!
//! The engine thread owns the live set ([`Adapters`]); handles read the published registry
//! ([`Registry`]) to bind a name. An unloaded adapter takes no new requests (queued ones fail
//! with a typed error at admission); running ones finish on it, then the backend drops it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};

use crate::backend::{AdapterId, Backend};
use crate::model::lora::{AdapterError, LoraAdapter};

/// Longest adapter name accepted (names travel in URLs, JSON and metric labels).
pub const MAX_ADAPTER_NAME_BYTES: usize = 256;

/// A loaded adapter, as handles and routes report it.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterInfo {
    /// The name requests use (vLLM's `lora_name`; the OpenAI `model` field).
    pub name: String,
    /// The backend's id of it.
    pub id: AdapterId,
    /// The folder it was read from.
    pub path: PathBuf,
    /// `r` of its config.
    pub rank: usize,
    /// `lora_alpha` of its config.
    pub alpha: f64,
    /// The module names it updates.
    pub targets: Vec<String>,
    /// Parameters it holds.
    pub num_params: usize,
    /// Its version: `name#id`; outputs on it report `base_version+name#id`.
    pub version: String,
}

/// The adapter a handle binds its requests to.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct AdapterRef {
    pub id: AdapterId,
    pub name: Arc<str>,
}

/// What the engine thread publishes: the live adapters by name.
#[derive(Debug, Default)]
pub(crate) struct Registry(RwLock<BTreeMap<String, AdapterInfo>>);

impl Registry {
    /// The adapter named `name`.
    pub fn get(&self, name: &str) -> Option<AdapterInfo> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    /// Every live adapter, by name.
    pub fn list(&self) -> Vec<AdapterInfo> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    fn set(&self, live: &BTreeMap<String, AdapterInfo>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = live.clone();
    }
}

/// Checks an adapter name: non-empty, at most [`MAX_ADAPTER_NAME_BYTES`], printable.
pub(crate) fn check_name(name: &str) -> Result<(), AdapterError> {
    let bad = |reason| {
        Err(AdapterError::InvalidName {
            name: name.chars().take(64).collect(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > MAX_ADAPTER_NAME_BYTES {
        return bad("it is longer than 256 bytes");
    }
    if name.chars().any(char::is_control) {
        return bad("it holds control characters");
    }
    Ok(())
}

/// The engine thread's adapters: the live ones, and unloaded ones still in use.
pub(crate) struct Adapters {
    live: BTreeMap<String, AdapterInfo>,
    /// Unloaded, but running requests still use them; dropped from the backend once none does.
    draining: Vec<AdapterId>,
    next_id: u32,
    max: usize,
    registry: Arc<Registry>,
}

impl Adapters {
    pub fn new(max: usize, registry: Arc<Registry>) -> Self {
        Self {
            live: BTreeMap::new(),
            draining: Vec::new(),
            next_id: 0,
            max,
            registry,
        }
    }

    /// Whether `id` is live (takes new requests).
    pub fn is_live(&self, id: AdapterId) -> bool {
        self.live.values().any(|a| a.id == id)
    }

    /// The version string of live adapter `id`.
    pub fn version(&self, id: AdapterId) -> Option<&str> {
        self.live
            .values()
            .find(|a| a.id == id)
            .map(|a| a.version.as_str())
    }

    /// Loads `adapter` into `backend` under `name`.
    pub fn load(
        &mut self,
        backend: &mut dyn Backend,
        name: String,
        adapter: &LoraAdapter,
    ) -> Result<AdapterInfo, AdapterError> {
        if self.live.contains_key(&name) {
            return Err(AdapterError::AlreadyLoaded(name));
        }
        if self.live.len() >= self.max {
            return Err(AdapterError::TooMany { max: self.max });
        }
        let id = AdapterId(self.next_id);
        let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            backend.load_adapter(id, adapter)
        }))
        .unwrap_or_else(|panic| {
            Err(AdapterError::Load {
                name: name.clone(),
                message: format!(
                    "the backend panicked: {}",
                    crate::sampling::batch::panic_message(panic)
                ),
            })
        });
        if let Err(err) = loaded {
            backend.unload_adapter(id);
            return Err(err);
        }
        self.next_id += 1;
        let info = AdapterInfo {
            version: format!("{name}#{}", id.0),
            name: name.clone(),
            id,
            path: adapter.path.clone(),
            rank: adapter.rank,
            alpha: adapter.alpha,
            targets: adapter.targets.clone(),
            num_params: adapter.num_params(),
        };
        self.live.insert(name, info.clone());
        self.registry.set(&self.live);
        Ok(info)
    }

    /// Takes `name` out of service; the backend drops it once `in_use` says no request runs
    /// on it (now, or in a later [`Adapters::settle`]).
    pub fn unload(
        &mut self,
        backend: &mut dyn Backend,
        name: &str,
        in_use: impl Fn(AdapterId) -> bool,
    ) -> Result<AdapterInfo, AdapterError> {
        let info = self
            .live
            .remove(name)
            .ok_or_else(|| AdapterError::NotFound(name.to_string()))?;
        self.registry.set(&self.live);
        if in_use(info.id) {
            self.draining.push(info.id);
        } else {
            backend.unload_adapter(info.id);
        }
        Ok(info)
    }

    /// Drops from the backend the unloaded adapters no running request uses any more.
    pub fn settle(&mut self, backend: &mut dyn Backend, in_use: impl Fn(AdapterId) -> bool) {
        self.draining.retain(|&id| {
            let keep = in_use(id);
            if !keep {
                backend.unload_adapter(id);
            }
            keep
        });
    }
}
