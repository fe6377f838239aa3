//! Offline runtime installs: pip-downloaded wheels unpacked atomically into `runtimes/<name>`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use super::remove_dir_if_exists;
use crate::run_status;

/// Where downloaded runtime wheels are kept, relative to the repository root.
pub const DOWNLOAD_DIR: &str = "runtimes/.download";
/// Marker written last into a complete runtime folder.
const MARKER_FILE: &str = ".infermux-installed";

/// A pinned PyPI distribution.
pub struct Wheel {
    /// Distribution name as given to pip (`nvidia-cuda-runtime`).
    pub name: &'static str,
    /// Exact version.
    pub version: &'static str,
}

/// Wheel members matching `glob` (fnmatch, `*` crosses `/`) go to `into` + name minus `strip`.
pub struct Pick {
    /// Pattern a member name must match.
    pub glob: &'static str,
    /// Prefix removed from the member name.
    pub strip: &'static str,
    /// Prefix (inside the runtime folder) the remaining name is placed under.
    pub into: &'static str,
}

/// A runtime assembled from one or more wheels.
pub struct Runtime {
    /// Folder name under `runtimes/`, also used in messages.
    pub name: &'static str,
    /// Marker contents; change it whenever the layout or the pins change.
    pub marker: &'static str,
    /// Wheels to fetch.
    pub wheels: &'static [Wheel],
    /// Members to take from every wheel.
    pub picks: &'static [Pick],
    /// Path (inside the folder) reported as ready; it must exist after installation.
    pub entry: &'static str,
    /// Post-processing and checks run on the temporary folder before it is renamed into place.
    pub finish: fn(&Path) -> Result<()>,
}

impl Pick {
    /// Members matching `glob`, at their path inside the wheel.
    pub const fn keep(glob: &'static str) -> Self {
        Self::moved(glob, "", "")
    }

    /// Members matching `glob`, with `strip` replaced by `into`.
    pub const fn moved(glob: &'static str, strip: &'static str, into: &'static str) -> Self {
        Self { glob, strip, into }
    }
}

impl Wheel {
    /// `name==version`.
    pub const fn pin(name: &'static str, version: &'static str) -> Self {
        Self { name, version }
    }

    /// `name==version`, as pip takes it.
    fn requirement(&self) -> String {
        format!("{}=={}", self.name, self.version)
    }

    /// Start of the wheel's file name (`nvidia_cuda_runtime-13.0.96-`).
    fn file_prefix(&self) -> String {
        format!("{}-{}-", self.name.replace(['-', '.'], "_"), self.version)
    }
}

/// Installs `rt` under `runtimes/` unless it is already complete; returns its entry path.
pub fn ensure(root: &Path, rt: &Runtime) -> Result<PathBuf> {
    let dir = root.join("runtimes").join(rt.name);
    let entry = dir.join(rt.entry);
    if is_ready(&dir, rt) {
        eprintln!("{} ready: {}", rt.name, entry.display());
        return Ok(entry);
    }
    let start = Instant::now();
    let wheels = ensure_wheels(root, rt.wheels)?;
    install(&wheels, rt, &dir)?;
    eprintln!(
        "{} ready: {} (installed in {:.1}s)",
        rt.name,
        entry.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(entry)
}

/// True when the marker matches and the entry path exists.
fn is_ready(dir: &Path, rt: &Runtime) -> bool {
    let marker = fs::read_to_string(dir.join(MARKER_FILE)).unwrap_or_default();
    marker == rt.marker && dir.join(rt.entry).exists()
}

/// Returns the wheel files, running one `pip download` for those not downloaded yet.
fn ensure_wheels(root: &Path, wheels: &[Wheel]) -> Result<Vec<PathBuf>> {
    let dir = root.join(DOWNLOAD_DIR);
    let missing: Vec<String> = wheels
        .iter()
        .filter(|w| find_wheel(&dir, w).is_none())
        .map(Wheel::requirement)
        .collect();
    if !missing.is_empty() {
        pip_download(&dir, &missing)?;
    }
    wheels
        .iter()
        .map(|w| {
            find_wheel(&dir, w)
                .with_context(|| format!("pip download produced no wheel for {}", w.requirement()))
        })
        .collect()
}

/// The first (by name) wheel file in `dir` for `wheel`, whatever its tags.
fn find_wheel(dir: &Path, wheel: &Wheel) -> Option<PathBuf> {
    let prefix = wheel.file_prefix();
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default();
            name.starts_with(&prefix) && name.ends_with(".whl")
        })
        .collect();
    found.sort();
    found.into_iter().next()
}

/// `python3 -m pip download --no-deps` of `requirements` into `dir`.
fn pip_download(dir: &Path, requirements: &[String]) -> Result<()> {
    eprintln!("downloading {} from PyPI…", requirements.join(" "));
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "pip", "download", "--disable-pip-version-check"])
        .args(["--no-deps", "--only-binary=:all:", "-d"])
        .arg(dir)
        .args(requirements);
    run_status(&mut cmd).context("pip download failed")
}

/// Extracts `wheels` into a temporary sibling of `dir`, finishes it and renames it into place.
fn install(wheels: &[PathBuf], rt: &Runtime, dir: &Path) -> Result<()> {
    let parent = dir.parent().context("runtime dir has no parent")?;
    let tmp = parent.join(format!(".{}.partial", rt.name));
    remove_dir_if_exists(&tmp)?;
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    for wheel in wheels {
        extract(wheel, rt.picks, &tmp)?;
    }
    (rt.finish)(&tmp).with_context(|| format!("finishing {}", rt.name))?;
    if !tmp.join(rt.entry).exists() {
        bail!("{} is missing after extraction", rt.entry);
    }
    fs::write(tmp.join(MARKER_FILE), rt.marker).context("writing marker")?;
    remove_dir_if_exists(dir)?;
    fs::rename(&tmp, dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))
}

/// Copies the members of `wheel` selected by `picks` into `dest`, printing progress.
fn extract(wheel: &Path, picks: &[Pick], dest: &Path) -> Result<()> {
    const SCRIPT: &str = r#"import fnmatch, os, shutil, sys, zipfile
wheel, dest, *spec = sys.argv[1:]
picks = [spec[i:i + 3] for i in range(0, len(spec), 3)]
def target(name):
    for glob, strip, into in picks:
        if fnmatch.fnmatchcase(name, glob) and name.startswith(strip):
            return into + name[len(strip):]
with zipfile.ZipFile(wheel) as z:
    todo = [(i, t) for i in z.infolist() if not i.is_dir() for t in [target(i.filename)] if t]
    total = sum(i.file_size for i, _ in todo) or 1
    print(f"extracting {len(todo)} files ({total / 1e6:.0f} MB) from {os.path.basename(wheel)}…",
          end="", file=sys.stderr, flush=True)
    done = shown = 0
    for info, rel in todo:
        path = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with z.open(info) as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        if mode := (info.external_attr >> 16) & 0o777:
            os.chmod(path, mode)
        done += info.file_size
        if done * 100 // total >= shown + 20:
            shown = done * 100 // total // 20 * 20
            print(f" {shown}%", end="", file=sys.stderr, flush=True)
    print(" done", file=sys.stderr)
"#;
    let mut cmd = Command::new("python3");
    cmd.args(["-c", SCRIPT]).arg(wheel).arg(dest);
    for pick in picks {
        cmd.args([pick.glob, pick.strip, pick.into]);
    }
    run_status(&mut cmd).with_context(|| format!("extracting {}", wheel.display()))
}

/// Fails when `ldd` reports an unresolved dependency of `lib`; skipped when `ldd` is missing.
pub fn check_ldd(lib: &Path) -> Result<()> {
    let output = match Command::new("ldd").arg(lib).output() {
        Ok(output) => output,
        Err(err) => {
            eprintln!(
                "warning: skipping dependency check of {}: {err}",
                lib.display()
            );
            return Ok(());
        }
    };
    let text = String::from_utf8_lossy(&output.stdout);
    let missing: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("not found"))
        .map(str::trim)
        .collect();
    if !output.status.success() || !missing.is_empty() {
        bail!(
            "ldd {} failed: {}{}",
            lib.display(),
            missing.join(", "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}
