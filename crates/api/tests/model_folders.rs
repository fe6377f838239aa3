//! Model folders that lie: a `config.json` whose values are absurd or contradict the weights, a
//! truncated or incomplete safetensors file, a folder with nothing in it, and weights that are
//! NaN. The real `infermux` binary must exit 1 with a message naming the field, tensor or
//! non-finite logits: never a panic (101), an abort (134), or tokens printed from garbage.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Map, Value, json};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A temporary model folder, removed on drop.
struct Folder(PathBuf);

impl Drop for Folder {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

impl Folder {
    fn empty() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "infermux-folders-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// A copy of the committed tiny random Llama 3 model.
    fn tiny() -> Self {
        let f = Self::empty();
        let src = root().join("tests/data/tiny/llama3");
        for entry in std::fs::read_dir(&src).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), f.0.join(entry.file_name())).unwrap();
        }
        f
    }

    /// The reference model's folder with its weights and tokenizer linked, not copied (only
    /// `config.json` is the folder's own, to be edited).
    fn reference() -> Self {
        let src = std::env::var_os("INFERMUX_MODEL_DIR")
            .map(PathBuf::from)
            .unwrap_or(root().join("models/SmolLM2-135M-Instruct"));
        assert!(
            src.join("model.safetensors").is_file(),
            "run `cargo xtask setup` first ({} is missing)",
            src.display()
        );
        let f = Self::empty();
        for name in [
            "model.safetensors",
            "tokenizer.json",
            "generation_config.json",
        ] {
            std::os::unix::fs::symlink(src.join(name), f.0.join(name)).unwrap();
        }
        std::fs::copy(src.join("config.json"), f.0.join("config.json")).unwrap();
        f
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn edit_config(&self, edit: impl FnOnce(&mut Map<String, Value>)) {
        let path = self.path("config.json");
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        edit(v.as_object_mut().unwrap());
        std::fs::write(path, v.to_string()).unwrap();
    }

    fn set(&self, key: &str, value: Value) {
        self.edit_config(|c| {
            c.insert(key.into(), value);
        });
    }
}

/// A safetensors file's header (name → entry) and the bytes after it.
fn read_safetensors(path: &Path) -> (Map<String, Value>, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (
        serde_json::from_slice(&bytes[8..8 + n]).unwrap(),
        bytes[8 + n..].to_vec(),
    )
}

fn write_safetensors(path: &Path, header: &Map<String, Value>, data: &[u8]) {
    let h = serde_json::to_vec(header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    std::fs::write(path, out).unwrap();
}

fn infermux(model: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_infermux"))
        .args(&args[..1])
        .args(["--model", model.to_str().unwrap(), "--backend", "candle"])
        .args(&args[1..])
        .output()
        .expect("running infermux")
}

/// `sample` and `logprobs` (plain and `--json`) on `model` each exit 1, print nothing on
/// stdout, and say every one of `words` on stderr.
fn both_fail(case: &str, model: &Path, words: &[&str]) {
    let runs: [&[&str]; 3] = [
        &[
            "sample",
            "--prompt",
            "hello",
            "--max-tokens",
            "4",
            "--temperature",
            "0",
        ],
        &[
            "sample",
            "--prompt-tokens",
            "1,2,3",
            "--max-tokens",
            "4",
            "--json",
        ],
        &["logprobs", "--prompt", "hello world", "--json"],
    ];
    for args in runs {
        let out = infermux(model, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{case}: `{}` exited with {:?}; stderr: {stderr}",
            args.join(" "),
            out.status
        );
        assert!(
            out.stdout.is_empty(),
            "{case}: `{}` printed {:?}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
        for w in words {
            assert!(
                stderr.contains(w),
                "{case}: `{}`: {w:?} is not in stderr: {stderr}",
                args.join(" ")
            );
        }
    }
}

#[test]
fn the_tiny_model_folder_works_before_it_is_edited() {
    // The baseline the other cases edit: the same commands succeed on the unedited copy, so
    // their failures come from the edit.
    let f = Folder::tiny();
    for args in [
        &[
            "sample",
            "--prompt",
            "hello",
            "--max-tokens",
            "4",
            "--temperature",
            "0",
            "--json",
        ][..],
        &["logprobs", "--prompt", "hello world", "--json"][..],
    ] {
        let out = infermux(&f.0, args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let finite = |x: &Value| x.as_f64().is_some_and(f64::is_finite);
        match args[0] {
            "sample" => {
                let lps = v["samples"][0]["logprobs"].as_array().unwrap();
                assert_eq!(lps.len(), 4, "{v}");
                assert!(lps.iter().all(finite), "{v}");
            }
            _ => {
                let lps = v["logprobs"].as_array().unwrap();
                assert!(lps.len() > 1 && lps[0].is_null(), "{v}");
                assert!(lps[1..].iter().all(finite), "{v}");
            }
        }
    }
}

#[test]
fn lying_config_values_exit_1_naming_the_field() {
    let cases: &[(&str, Value, &[&str])] = &[
        (
            "num_hidden_layers",
            json!(1e9),
            &["num_hidden_layers", "1000000000"],
        ),
        (
            "num_hidden_layers",
            json!(1_000_000_000u64),
            &["num_hidden_layers is 1000000000"],
        ),
        (
            "num_hidden_layers",
            json!(3),
            &["num_hidden_layers is 3", "2 layers"],
        ),
        (
            "max_position_embeddings",
            json!(1e12),
            &["max_position_embeddings"],
        ),
        (
            "max_position_embeddings",
            json!(1_000_000_000_000u64),
            &["max_position_embeddings is 1000000000000"],
        ),
        (
            "hidden_size",
            json!(128),
            &["hidden_size = 128", "model.embed_tokens.weight"],
        ),
        (
            "vocab_size",
            json!(512),
            &["vocab_size = 512", "model.embed_tokens.weight"],
        ),
        (
            "num_key_value_heads",
            json!(3),
            &["num_key_value_heads (3)"],
        ),
        ("rope_theta", json!(0), &["rope_theta is 0"]),
        ("rope_theta", json!(-1), &["rope_theta is -1"]),
        ("rms_norm_eps", json!(-1), &["rms_norm_eps is -1"]),
        ("rms_norm_eps", json!("NaN"), &["rms_norm_eps", "\"NaN\""]),
        ("head_dim", json!(0), &["head_dim is 0"]),
        (
            "tie_word_embeddings",
            json!("yes"),
            &["tie_word_embeddings", "\"yes\""],
        ),
        ("hidden_size", json!("64"), &["hidden_size", "\"64\""]),
        (
            "eos_token_id",
            json!(256),
            &["eos_token_id 256", "vocab_size 256"],
        ),
        (
            "rope_parameters",
            json!({"rope_type": "default", "rope_theta": 0}),
            &["rope_parameters.rope_theta is 0"],
        ),
    ];
    for (field, value, words) in cases {
        let f = Folder::tiny();
        f.set(field, value.clone());
        let mut words = words.to_vec();
        words.push("config.json");
        both_fail(&format!("{field} = {value}"), &f.0, &words);
    }
}

#[test]
fn a_missing_field_or_a_config_that_is_not_json_exits_1() {
    let f = Folder::tiny();
    f.edit_config(|c| {
        c.remove("hidden_size");
    });
    both_fail("no hidden_size", &f.0, &["missing field hidden_size"]);

    std::fs::write(f.path("config.json"), "{\"hidden_size\": 64,").unwrap();
    both_fail(
        "config.json cut short",
        &f.0,
        &["config.json", "not valid JSON"],
    );

    let empty = Folder::empty();
    both_fail("empty folder", &empty.0, &["missing config.json"]);
}

#[test]
fn truncated_or_incomplete_weights_exit_1_naming_the_tensor() {
    let f = Folder::tiny();
    let weights = f.path("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    both_fail(
        "truncated weights",
        &f.0,
        &["model.safetensors", "truncated"],
    );

    let (mut header, data) =
        read_safetensors(&root().join("tests/data/tiny/llama3/model.safetensors"));
    header.remove("model.norm.weight");
    write_safetensors(&weights, &header, &data);
    both_fail("missing tensor", &f.0, &["no tensor model.norm.weight"]);

    std::fs::remove_file(&weights).unwrap();
    both_fail("no weights", &f.0, &["missing model.safetensors"]);
}

#[test]
fn the_reference_model_with_a_lying_config_exits_1() {
    // The folder the defect was seen on: the reference model's weights under an edited config.
    let cases: &[(&str, Value, &str)] = &[
        (
            "num_hidden_layers",
            json!(1_000_000_000u64),
            "num_hidden_layers is 1000000000",
        ),
        (
            "max_position_embeddings",
            json!(1_000_000_000_000u64),
            "max_position_embeddings is 1000000000000",
        ),
        ("num_hidden_layers", json!(31), "num_hidden_layers is 31"),
        ("rope_theta", json!(0), "rope_theta is 0"),
        ("rms_norm_eps", json!(-1), "rms_norm_eps is -1"),
    ];
    for (field, value, words) in cases {
        let f = Folder::reference();
        f.set(field, value.clone());
        both_fail(&format!("reference {field} = {value}"), &f.0, &[words]);
    }
}

#[test]
fn nan_weights_exit_1_saying_the_logits_are_not_finite() {
    // The final norm's weight overwritten with NaN: every logit is NaN, whatever the prompt.
    let f = Folder::tiny();
    let weights = f.path("model.safetensors");
    let (header, mut data) = read_safetensors(&weights);
    let entry = &header["model.norm.weight"];
    assert_eq!(entry["dtype"], "F32");
    let offsets: Vec<usize> = entry["data_offsets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap() as usize)
        .collect();
    for chunk in data[offsets[0]..offsets[1]].chunks_exact_mut(4) {
        chunk.copy_from_slice(&f32::NAN.to_le_bytes());
    }
    write_safetensors(&weights, &header, &data);
    both_fail("NaN weights", &f.0, &["produced NaN logits"]);
}

#[test]
fn serve_on_a_lying_folder_exits_1_instead_of_listening() {
    let f = Folder::tiny();
    f.set("rms_norm_eps", json!(-1));
    let mut child = Command::new(env!("CARGO_BIN_EXE_infermux"))
        .args([
            "serve",
            "--model",
            f.0.to_str().unwrap(),
            "--backend",
            "candle",
        ])
        .args(["--port", "0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running infermux serve");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            child.kill().ok();
            child.wait().ok();
            panic!("infermux serve kept running on a folder whose config lies");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("rms_norm_eps is -1"), "{stderr}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("listening"),
        "{stderr}"
    );
}
