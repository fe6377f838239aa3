use super::*;

/// A GGUF writer for tests: metadata of strings, u32s and f32s, tensors of any type code.
#[derive(Default)]
struct Writer {
    kv: Vec<(String, Vec<u8>)>,
    tensors: Vec<(String, Vec<u64>, u32, usize)>,
}

fn gstr(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

impl Writer {
    fn u32(mut self, k: &str, v: u32) -> Self {
        let mut b = 4u32.to_le_bytes().to_vec();
        b.extend_from_slice(&v.to_le_bytes());
        self.kv.push((k.into(), b));
        self
    }
    fn f32(mut self, k: &str, v: f32) -> Self {
        let mut b = 6u32.to_le_bytes().to_vec();
        b.extend_from_slice(&v.to_le_bytes());
        self.kv.push((k.into(), b));
        self
    }
    fn str(mut self, k: &str, v: &str) -> Self {
        let mut b = 8u32.to_le_bytes().to_vec();
        b.extend(gstr(v));
        self.kv.push((k.into(), b));
        self
    }
    /// A tensor of `bytes` bytes (ggml dims order).
    fn tensor(mut self, name: &str, dims: &[u64], ty: u32, bytes: usize) -> Self {
        self.tensors.push((name.into(), dims.to_vec(), ty, bytes));
        self
    }
    fn bytes(&self) -> Vec<u8> {
        let mut out = MAGIC.to_le_bytes().to_vec();
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            out.extend(gstr(k));
            out.extend_from_slice(v);
        }
        let mut offset = 0u64;
        for (name, dims, ty, bytes) in &self.tensors {
            out.extend(gstr(name));
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset += (*bytes as u64).div_ceil(32) * 32;
        }
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
        for (_, _, _, bytes) in &self.tensors {
            out.extend(std::iter::repeat_n(7u8, bytes.div_ceil(32) * 32));
        }
        out
    }
    fn write(&self, name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("infermux-gguf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, self.bytes()).unwrap();
        path
    }
}

/// A two-layer Llama: hidden 32, 4 heads of 8, 2 KV heads, MLP 64, vocab 64, Q8_0 projections.
fn tiny_llama() -> Writer {
    let mut w = Writer::default()
        .str("general.architecture", "llama")
        .u32("llama.embedding_length", 32)
        .u32("llama.feed_forward_length", 64)
        .u32("llama.block_count", 2)
        .u32("llama.attention.head_count", 4)
        .u32("llama.attention.head_count_kv", 2)
        .u32("llama.context_length", 128)
        .u32("llama.vocab_size", 64)
        .f32("llama.rope.freq_base", 10000.0)
        .f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        .u32("tokenizer.ggml.eos_token_id", 2)
        .tensor("token_embd.weight", &[32, 64], 8, 64 * 34)
        .tensor("output_norm.weight", &[32], 0, 32 * 4)
        .tensor("rope_freqs.unused", &[4], 0, 16);
    for l in 0..2 {
        let t = |n: &str| format!("blk.{l}.{n}.weight");
        w = w
            .tensor(&t("attn_norm"), &[32], 0, 128)
            .tensor(&t("attn_q"), &[32, 32], 8, 32 * 34)
            .tensor(&t("attn_k"), &[32, 16], 8, 16 * 34)
            .tensor(&t("attn_v"), &[32, 16], 3, 16 * 20)
            .tensor(&t("attn_output"), &[32, 32], 8, 32 * 34)
            .tensor(&t("ffn_norm"), &[32], 0, 128)
            .tensor(&t("ffn_gate"), &[32, 64], 8, 64 * 34)
            .tensor(&t("ffn_up"), &[32, 64], 8, 64 * 34)
            .tensor(&t("ffn_down"), &[64, 32], 8, 32 * 2 * 34);
    }
    w
}

#[test]
fn a_llama_gguf_opens_as_a_model_with_hf_names_and_ggml_types() {
    let path = tiny_llama().write("tiny.gguf");
    assert!(is_gguf(&path));
    let dir = crate::model::ModelDir::open(&path).unwrap();
    assert_eq!(dir.config.num_layers, 2);
    assert_eq!(dir.config.num_kv_heads, 2);
    assert_eq!(dir.config.head_dim, 8);
    assert_eq!(dir.config.rms_norm_eps, 1e-5);
    assert!(dir.config.tie_word_embeddings, "no output.weight: tied");
    assert_eq!(dir.eos_token_ids, vec![2]);
    assert_eq!(dir.checkpoint.format, WeightFormat::Gguf);
    let k = dir
        .checkpoint
        .get("model.layers.1.self_attn.k_proj.weight")
        .unwrap();
    assert_eq!(
        (k.dtype.as_str(), k.shape.as_slice()),
        ("Q8_0", &[16, 32][..])
    );
    assert_eq!(k.end - k.begin, 16 * 34);
    assert_eq!(
        dir.checkpoint
            .get("model.layers.0.self_attn.v_proj.weight")
            .unwrap()
            .dtype,
        "Q4_1"
    );
    assert!(!dir.checkpoint.contains("rope_freqs.unused"));
    let (cfg, eos) = crate::model::read_config(&path).unwrap();
    assert_eq!((cfg.hidden_size, eos), (32, vec![2]));
}

#[test]
fn an_unsupported_tensor_type_or_architecture_is_named() {
    let mut w = tiny_llama();
    w.tensors[4].2 = 16; // blk.0.attn_q as IQ2_XXS
    let err = crate::model::ModelDir::open(w.write("iq.gguf"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.layers.0.self_attn.q_proj.weight") && err.contains("ggml type 16"),
        "{err}"
    );
    assert!(
        err.contains("Q4_1") && err.contains("Q6_K"),
        "lists what loads: {err}"
    );
    let w = tiny_llama().str("general.architecture", "mamba");
    let err = crate::model::ModelDir::open(w.write("mamba.gguf"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("mamba") && err.contains("llama"), "{err}");
    let w = tiny_llama().tensor("rope_freqs.weight", &[4], 0, 16);
    let err = crate::model::ModelDir::open(w.write("rope.gguf"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("RoPE scaling"), "{err}");
}

#[test]
fn hostile_headers_are_typed_errors_not_allocations() {
    let good = tiny_llama().bytes();
    let dir = std::env::temp_dir().join(format!("infermux-gguf-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let check = |name: &str, bytes: &[u8], needle: &str| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        let err = GgufFile::read(&path).unwrap_err().to_string();
        assert!(err.contains(needle), "{name}: {err}");
    };
    // Every truncation of the header is an error naming the file, never a panic.
    for cut in (0..1200).step_by(7) {
        let path = dir.join("cut.gguf");
        std::fs::write(&path, &good[..cut]).unwrap();
        let err = GgufFile::read(&path).unwrap_err().to_string();
        assert!(err.contains("cut.gguf"), "cut at {cut}: {err}");
    }
    // A huge tensor count.
    let mut b = good.clone();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    check("count.gguf", &b, "tensor count");
    // A huge string length in the first key.
    let mut b = good.clone();
    b[24..32].copy_from_slice(&(1u64 << 60).to_le_bytes());
    check("string.gguf", &b, "string length");
    let mut b = good.clone();
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    check("v1.gguf", &b, "version 1");
    // Data cut short: the last tensor ends past the file.
    check("short.gguf", &good[..good.len() - 64], "ends past the file");
}

#[test]
fn unpermute_inverts_llama_cpp_permute() {
    // llama.cpp's `permute`: rows [n_head, 2, d/2] → [n_head, d/2, 2].
    let (n_head, rows, width) = (3, 12, 5);
    let orig: Vec<u32> = (0..(rows * width) as u32).collect();
    let half = rows / n_head / 2;
    let mut permuted = Vec::new();
    for h in 0..n_head {
        for i in 0..half {
            for p in 0..2 {
                let src = h * 2 * half + p * half + i;
                permuted.extend_from_slice(&orig[src * width..][..width]);
            }
        }
    }
    assert_ne!(permuted, orig);
    assert_eq!(unpermute_rows(&permuted, rows, n_head).unwrap(), orig);
    assert_eq!(unpermute_rows(&permuted, 10, n_head), None);
}

#[test]
fn type_names_round_trip_and_rows_are_whole_blocks() {
    for t in GGUF_TYPES {
        assert_eq!(GgmlType::from_name(&t.name()), Some(*t));
        assert_eq!(GgmlType::from_code(t.code()), *t);
    }
    assert_eq!(GgmlType::Other(99).code(), 99);
    assert_eq!(GgmlType::Q4_1.row_bytes(64), Some(40));
    assert_eq!(GgmlType::Q6K.row_bytes(576), None);
    assert_eq!(GgmlType::Other(99).row_bytes(32), None);
}
