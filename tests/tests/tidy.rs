//! Tidy checks, run as ordinary tests: the code base stays easy to live in.

use std::path::Path;

use infermux_tests::repo_root;

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if path.is_dir() && name != "target" && !name.to_string_lossy().starts_with('.') {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_source_file_exceeds_1000_lines() {
    let root = repo_root();
    let mut files = Vec::new();
    for dir in ["crates", "xtask", "tests"] {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(
        files.len() > 20,
        "the walk found too few files: {}",
        files.len()
    );
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let lines = std::fs::read_to_string(f).unwrap().lines().count();
            (lines > 1000).then(|| format!("{} ({lines} lines)", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "split these files: {long:?}");
}

#[test]
fn libraries_do_not_use_anyhow() {
    let root = repo_root();
    for krate in [
        "crates/core",
        "crates/backend-candle",
        "crates/backend-torch",
        "crates/backend-onnx",
    ] {
        let manifest = std::fs::read_to_string(root.join(krate).join("Cargo.toml")).unwrap();
        assert!(
            !manifest.contains("anyhow"),
            "{krate} must return typed errors, not anyhow"
        );
    }
}

/// One `tokenizers` in the tree: the API, guided decoding and candle must agree on token ids,
/// and two copies would double its build time. `Cargo.lock` lists every resolved version.
#[test]
fn one_tokenizers_version_in_the_lock_file() {
    let lock = std::fs::read_to_string(repo_root().join("Cargo.lock")).unwrap();
    let versions: Vec<&str> = lock
        .split("[[package]]")
        .filter(|pkg| pkg.contains("\nname = \"tokenizers\"\n"))
        .filter_map(|pkg| pkg.lines().find_map(|l| l.strip_prefix("version = ")))
        .collect();
    assert_eq!(
        versions.len(),
        1,
        "tokenizers versions in Cargo.lock: {versions:?}"
    );
}
