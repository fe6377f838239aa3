//! `ModelRegistry`: base model names resolve offline through models folders and the Hugging
//! Face cache layout; unknown names fail with a typed error listing what is available.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use infermux::{Error, ModelLocation, ModelRegistry, RegistryError, ServiceClient};

/// A fresh folder under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "infermux-registry-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn fake_model(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), "{}").unwrap();
    dir.to_path_buf()
}

/// `hub/models--ORG--NAME/snapshots/REV/` for each revision; `refs/main` names `main_rev`.
fn fake_cache_entry(hub: &Path, org_name: &str, revs: &[&str], main_rev: Option<&str>) -> PathBuf {
    let entry = hub.join(format!("models--{}", org_name.replace('/', "--")));
    for rev in revs {
        fake_model(&entry.join("snapshots").join(rev));
    }
    if let Some(rev) = main_rev {
        std::fs::create_dir_all(entry.join("refs")).unwrap();
        std::fs::write(entry.join("refs/main"), format!("{rev}\n")).unwrap();
    }
    entry
}

#[test]
fn models_folder_layouts_resolve() {
    let tmp = TempDir::new();
    let models = tmp.0.join("models");
    let plain = fake_model(&models.join("SmolLM2-135M-Instruct"));
    let nested = fake_model(&models.join("Qwen/Qwen3-0.6B"));
    let cached = fake_cache_entry(&models, "meta-llama/Llama-3.2-1B", &["abc"], None);
    std::fs::create_dir_all(models.join("not-a-model/empty")).unwrap();
    let r = ModelRegistry::empty().with_models_dir(&models);

    assert_eq!(r.resolve("SmolLM2-135M-Instruct").unwrap(), plain);
    // An org-qualified name finds a plain folder of the same name.
    assert_eq!(
        r.resolve("HuggingFaceTB/SmolLM2-135M-Instruct").unwrap(),
        plain
    );
    assert_eq!(r.resolve("Qwen/Qwen3-0.6B").unwrap(), nested);
    assert_eq!(r.resolve("Qwen3-0.6B").unwrap(), nested);
    assert_eq!(
        r.resolve("qwen3-0.6b").unwrap(),
        nested,
        "case-insensitive fallback"
    );
    assert_eq!(
        r.resolve("meta-llama/Llama-3.2-1B").unwrap(),
        cached.join("snapshots/abc")
    );
    // A different organization does not match.
    assert!(matches!(
        r.resolve("Other/Qwen3-0.6B"),
        Err(RegistryError::UnknownModel { .. })
    ));

    let names: Vec<String> = r.list().into_iter().map(|m| m.name).collect();
    assert_eq!(
        names,
        [
            "Qwen/Qwen3-0.6B",
            "SmolLM2-135M-Instruct",
            "meta-llama/Llama-3.2-1B"
        ]
    );
}

#[test]
fn hf_cache_layout_resolves_refs_main_then_newest_snapshot() {
    let tmp = TempDir::new();
    let hub = tmp.0.join("hub");
    let smol = fake_cache_entry(
        &hub,
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        &["1111", "2222"],
        Some("1111"),
    );
    let gpt2 = fake_cache_entry(&hub, "gpt2", &["old"], None);
    std::thread::sleep(std::time::Duration::from_millis(20));
    fake_model(&gpt2.join("snapshots/new"));
    // A snapshot without config.json (an interrupted download) is skipped.
    std::fs::create_dir_all(gpt2.join("snapshots/partial")).unwrap();
    // Datasets in the same cache are not models.
    fake_model(&hub.join("datasets--x--y/snapshots/r"));
    let r = ModelRegistry::empty().with_hf_cache(&hub);

    let want = smol.join("snapshots/1111");
    assert_eq!(
        r.resolve("HuggingFaceTB/SmolLM2-135M-Instruct").unwrap(),
        want
    );
    assert_eq!(r.resolve("SmolLM2-135M-Instruct").unwrap(), want);
    let found = r.lookup("SmolLM2-135M-Instruct").unwrap();
    assert_eq!(found.location, ModelLocation::HfCache);
    assert_eq!(found.name, "HuggingFaceTB/SmolLM2-135M-Instruct");
    assert_eq!(r.resolve("gpt2").unwrap(), gpt2.join("snapshots/new"));
}

#[test]
fn models_folders_come_before_the_cache_and_short_names_can_be_ambiguous() {
    let tmp = TempDir::new();
    let models = tmp.0.join("models");
    let hub = tmp.0.join("hub");
    let local = fake_model(&models.join("SmolLM2-135M-Instruct"));
    let cached = fake_cache_entry(&hub, "HuggingFaceTB/SmolLM2-135M-Instruct", &["r"], None);
    fake_cache_entry(&hub, "a/Tiny", &["r"], None);
    fake_cache_entry(&hub, "b/Tiny", &["r"], None);
    let r = ModelRegistry::empty()
        .with_hf_cache(&hub)
        .with_models_dir(&models);

    assert_eq!(r.resolve("SmolLM2-135M-Instruct").unwrap(), local);
    // The exact org-qualified name is the cache entry.
    assert_eq!(
        r.resolve("HuggingFaceTB/SmolLM2-135M-Instruct").unwrap(),
        cached.join("snapshots/r")
    );
    match r.resolve("Tiny") {
        Err(RegistryError::Ambiguous { candidates, .. }) => {
            assert_eq!(candidates.len(), 2, "{candidates:?}");
            assert!(candidates[0].starts_with("a/Tiny"), "{candidates:?}");
        }
        other => panic!("expected Ambiguous, got {other:?}"),
    }
    assert_eq!(
        r.resolve("b/Tiny").unwrap(),
        hub.join("models--b--Tiny/snapshots/r")
    );
}

#[test]
fn unknown_names_list_what_is_available() {
    let tmp = TempDir::new();
    let models = tmp.0.join("models");
    let hub = tmp.0.join("hub");
    fake_model(&models.join("SmolLM2-135M-Instruct"));
    fake_cache_entry(&hub, "Qwen/Qwen3-0.6B", &["r"], None);
    let r = ModelRegistry::empty()
        .with_hf_cache(&hub)
        .with_models_dir(&models);

    let err = r.resolve("Llama-3-70B").unwrap_err();
    match &err {
        RegistryError::UnknownModel {
            name,
            available,
            searched,
        } => {
            assert_eq!(name, "Llama-3-70B");
            assert_eq!(available, &["SmolLM2-135M-Instruct", "Qwen/Qwen3-0.6B"]);
            assert_eq!(searched, &[models.clone(), hub.clone()]);
        }
        other => panic!("expected UnknownModel, got {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("Llama-3-70B")
            && text.contains("available: SmolLM2-135M-Instruct, Qwen/Qwen3-0.6B"),
        "{text}"
    );

    let empty = ModelRegistry::empty().with_models_dir(tmp.0.join("nothing-here"));
    let text = empty.resolve("x").unwrap_err().to_string();
    assert!(text.contains("no model is available"), "{text}");

    // Through the service client, the same message arrives as an `Error` (nothing is loaded).
    let service = ServiceClient::new().with_registry(r);
    let err = service
        .create_sampling_client_from_base_model("Llama-3-70B")
        .unwrap_err();
    assert!(matches!(err, Error::Registry(_)), "{err:?}");
    assert!(
        err.to_string().contains("available: SmolLM2-135M-Instruct"),
        "{err}"
    );
}

#[test]
fn registry_is_shareable() {
    fn assert_send_sync<T: Send + Sync + Clone>() {}
    assert_send_sync::<ModelRegistry>();
    assert_send_sync::<ServiceClient>();
}
