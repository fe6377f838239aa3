//! The conformance suite: the same cases for every backend compiled in. A backend can only get
//! its logits wrong, and these cases check logits (against Hugging Face transformers), and what
//! the engine builds on them, on the real reference model — and, per backend, prompt logprobs
//! and greedy continuations of the tiny random-weight variants in `tests/data/tiny/` (Llama with
//! llama3 RoPE scaling and an untied head, Mistral, Qwen2 with q/k/v biases, Qwen3 with q/k norm).

use std::path::Path;
use std::sync::{Mutex, OnceLock};

use infermux::{
    BackendKind, EngineError, ImageChunk, ImageFormat, LoadOptions, ModelInput, ModelInputChunk,
    SamplingClient, SamplingParams, ServiceClient, ValidationError,
};
use infermux_tests::{
    GoldenCase, LLAMACPP_F16_GOLDENS, LLAMACPP_Q4_1_GOLDENS, LLAMACPP_Q8_0_GOLDENS, TINY_VARIANTS,
    Tolerance, derived_gguf_file, gguf_file, gguf_tensor_digest, goldens, load_goldens, model_dir,
    repo_root, tiny_goldens, tiny_model_dir,
};

fn load(backend: BackendKind) -> SamplingClient {
    load_from(backend, &model_dir())
}

fn load_from(backend: BackendKind, dir: &Path) -> SamplingClient {
    let options = LoadOptions {
        backend,
        ..LoadOptions::default()
    };
    ServiceClient::with_options(options)
        .create_sampling_client(dir)
        .unwrap_or_else(|e| panic!("{backend}: loading {}: {e}", dir.display()))
}

/// One shared client per backend, exercised concurrently by the tests of this binary.
fn shared(backend: BackendKind) -> &'static SamplingClient {
    static CLIENTS: [OnceLock<SamplingClient>; 3] =
        [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let i = BackendKind::ALL
        .iter()
        .position(|&b| b == backend)
        .expect("known backend");
    CLIENTS[i].get_or_init(|| load(backend))
}

/// One shared client per backend and tiny variant, loaded on first use.
fn tiny_shared(backend: BackendKind, variant: &'static str) -> &'static SamplingClient {
    type Clients = Vec<((BackendKind, &'static str), &'static SamplingClient)>;
    static CLIENTS: Mutex<Clients> = Mutex::new(Vec::new());
    let mut clients = CLIENTS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, c)) = clients.iter().find(|(k, _)| *k == (backend, variant)) {
        return c;
    }
    let client: &'static SamplingClient = Box::leak(Box::new(load_from(
        backend,
        &tiny_model_dir(variant, backend),
    )));
    clients.push(((backend, variant), client));
    client
}

fn prompt_logprobs_match_reference(backend: BackendKind) {
    check_prompt_logprobs(
        backend.as_str(),
        shared(backend),
        goldens().cases,
        Tolerance::F32_VS_REFERENCE,
    );
}

/// Every golden prompt scored at once: logprobs within `tolerance`.
fn check_prompt_logprobs(
    backend: &str,
    client: &SamplingClient,
    cases: Vec<GoldenCase>,
    tolerance: Tolerance,
) {
    let pending: Vec<_> = cases
        .into_iter()
        .map(|case| {
            let fut = client.compute_logprobs(ModelInput::from_ints(case.prompt_tokens.clone()));
            (case, fut)
        })
        .collect();
    for (case, fut) in pending {
        let got = fut.wait().expect("scoring");
        assert_eq!(got.len(), case.prompt_tokens.len());
        assert_eq!(
            got[0], None,
            "{}: the first prompt token has no logprob",
            case.name
        );
        let got: Vec<f64> = got[1..]
            .iter()
            .map(|x| x.expect("later tokens have logprobs") as f64)
            .collect();
        let expected: Vec<f64> = case.prompt_logprobs[1..]
            .iter()
            .map(|x| x.expect("golden"))
            .collect();
        let worst = tolerance.check(
            &format!("{backend} {} prompt logprobs", case.name),
            &got,
            &expected,
        );
        eprintln!(
            "{backend} {}: {} prompt tokens, max |Δ logprob| = {worst:.2e}",
            case.name,
            got.len() + 1
        );
    }
}

#[cfg_attr(not(any(feature = "torch", feature = "onnx")), allow(dead_code))]
fn agrees_with_candle(backend: BackendKind) {
    let (ours, reference) = (shared(backend), shared(BackendKind::Candle));
    for case in goldens().cases {
        let prompt = ModelInput::from_ints(case.prompt_tokens.clone());
        let (a, b) = (
            ours.compute_logprobs(prompt.clone()),
            reference.compute_logprobs(prompt),
        );
        let flat =
            |v: Vec<Option<f32>>| v[1..].iter().map(|x| x.unwrap() as f64).collect::<Vec<_>>();
        let (a, b) = (flat(a.wait().unwrap()), flat(b.wait().unwrap()));
        let worst = Tolerance::F32_VS_REFERENCE.check(
            &format!("{backend} vs candle {}", case.name),
            &a,
            &b,
        );
        eprintln!(
            "{backend} vs candle {}: max |Δ logprob| = {worst:.2e}",
            case.name
        );
    }
}

fn tokenizer_matches_reference(backend: BackendKind) {
    check_tokenizer(shared(backend));
}

/// The client's tokenizer encodes every golden prompt to the goldens' ids.
fn check_tokenizer(client: &SamplingClient) {
    let tokenizer = client.get_tokenizer();
    for case in goldens().cases {
        assert_eq!(
            tokenizer.encode(&case.prompt, false).unwrap(),
            case.prompt_tokens,
            "{}",
            case.name
        );
    }
}

fn greedy_matches_reference(backend: BackendKind) {
    check_greedy(
        backend.as_str(),
        shared(backend),
        goldens().cases,
        Tolerance::F32_VS_REFERENCE,
        None,
    );
}

/// 32 greedy tokens of every golden prompt (all decoded together) against the goldens', their
/// logprobs within `tolerance`. With `near_tie`, the continuation may leave the golden's at a
/// step where our logprob of the golden's token is within `near_tie` of our own choice (after
/// that the two continue from different texts); the logprobs are compared up to there.
fn check_greedy(
    backend: &str,
    client: &SamplingClient,
    cases: Vec<GoldenCase>,
    tolerance: Tolerance,
    near_tie: Option<f64>,
) {
    let params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(32)
    };
    let pending: Vec<_> = cases
        .into_iter()
        .map(|case| {
            let fut = client.sample(
                ModelInput::from_ints(case.prompt_tokens.clone()),
                1,
                params.clone(),
                false,
                0,
            );
            (case, fut)
        })
        .collect();
    for (case, fut) in pending {
        let seq = fut.wait().expect("sampling").sequences.remove(0);
        let agree = seq
            .tokens
            .iter()
            .zip(&case.greedy_tokens)
            .take_while(|(a, b)| a == b)
            .count();
        let got: Vec<f64> = seq.logprobs.unwrap().iter().map(|&x| x as f64).collect();
        let compared = match near_tie {
            Some(tie) if agree < case.greedy_tokens.len() => {
                let mut scored = case.prompt_tokens.clone();
                scored.extend_from_slice(&case.greedy_tokens[..=agree]);
                let lps = client
                    .compute_logprobs(ModelInput::from_ints(scored))
                    .wait()
                    .expect("scoring");
                let theirs = lps.last().copied().flatten().expect("a logprob") as f64;
                let gap = got[agree] - theirs;
                assert!(
                    gap <= tie,
                    "{backend} {}: greedy continuation differs after {agree} equal tokens, where \
                     the golden's token is {gap:.3} below ours (a near-tie is ≤ {tie})",
                    case.name
                );
                eprintln!(
                    "{backend} {}: greedy continuation leaves the golden's after {agree} tokens \
                     at a near-tie ({gap:.3} nats)",
                    case.name
                );
                agree
            }
            _ => {
                assert_eq!(
                    seq.tokens, case.greedy_tokens,
                    "{backend} {}: greedy continuation differs after {agree} equal tokens",
                    case.name
                );
                got.len()
            }
        };
        let worst = tolerance.check(
            &format!("{backend} {} greedy logprobs", case.name),
            &got[..compared],
            &case.greedy_logprobs[..compared],
        );
        eprintln!(
            "{backend} {}: {} greedy tokens equal, max |Δ logprob| = {worst:.2e}",
            case.name, compared
        );
    }
}

fn tiny_prompt_logprobs_match_reference(backend: BackendKind, variant: &'static str) {
    let client = tiny_shared(backend, variant);
    check_prompt_logprobs(
        backend.as_str(),
        client,
        tiny_goldens(variant).cases,
        Tolerance::F32_VS_REFERENCE,
    );
}

fn tiny_greedy_matches_reference(backend: BackendKind, variant: &'static str) {
    let client = tiny_shared(backend, variant);
    check_greedy(
        backend.as_str(),
        client,
        tiny_goldens(variant).cases,
        Tolerance::F32_VS_REFERENCE,
        None,
    );
}

fn sampled_logprobs_equal_compute_logprobs(backend: BackendKind) {
    let client = shared(backend);
    let prompt = client
        .get_tokenizer()
        .encode("Once upon a time, in a small village,", false)
        .unwrap();
    let params = SamplingParams {
        temperature: 1.0,
        seed: Some(1234),
        max_tokens: Some(24),
        ignore_eos: true,
        ..Default::default()
    };
    let response = client
        .sample(ModelInput::from_ints(prompt.clone()), 2, params, false, 0)
        .wait()
        .unwrap();
    for seq in response.sequences {
        let mut full = prompt.clone();
        full.extend(&seq.tokens);
        let scored = client
            .compute_logprobs(ModelInput::from_ints(full))
            .wait()
            .unwrap();
        let scored: Vec<f64> = scored[prompt.len()..]
            .iter()
            .map(|x| x.unwrap() as f64)
            .collect();
        let sampled: Vec<f64> = seq.logprobs.unwrap().iter().map(|&x| x as f64).collect();
        Tolerance::SAMPLE_VS_SCORE.check(
            &format!("{backend} sampled vs scored"),
            &sampled,
            &scored,
        );
    }
}

fn seeded_samples_are_batch_independent(backend: BackendKind) {
    // A private engine, so "alone" really is alone.
    let client = load(backend);
    let tokenizer = client.get_tokenizer();
    let prompt = ModelInput::from_ints(tokenizer.encode("My favourite animal is", false).unwrap());
    let params = SamplingParams {
        temperature: 0.8,
        seed: Some(7),
        max_tokens: Some(16),
        ..Default::default()
    };
    let alone = client
        .sample(prompt.clone(), 4, params.clone(), false, 0)
        .wait()
        .unwrap();
    let others: Vec<_> = (0..8)
        .map(|i| {
            let text = format!("Request number {i} asks about the number {}", i * 17);
            let p = ModelInput::from_ints(tokenizer.encode(&text, false).unwrap());
            let params = SamplingParams {
                temperature: 1.0,
                seed: Some(i),
                max_tokens: Some(12 + i as usize),
                ..Default::default()
            };
            client.sample(p, 1, params, false, 0)
        })
        .collect();
    let busy = client.sample(prompt, 4, params, false, 0).wait().unwrap();
    for o in others {
        o.wait().unwrap();
    }
    let tokens = |r: &infermux::SampleResponse| {
        r.sequences
            .iter()
            .map(|s| s.tokens.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        tokens(&alone),
        tokens(&busy),
        "{backend}: seeded samples changed under load"
    );
    let distinct: std::collections::HashSet<_> = tokens(&alone).into_iter().collect();
    assert!(
        distinct.len() > 1,
        "{backend}: four samples at T=0.8 should not all be equal"
    );
}

fn bad_inputs_get_typed_errors(backend: BackendKind) {
    let client = shared(backend);
    let vocab = 49152u32;
    let ok = SamplingParams::greedy(4);
    let sample = |prompt: ModelInput, params: SamplingParams| {
        client.sample(prompt, 1, params, false, 0).wait()
    };
    let invalid = |r: infermux::Result<infermux::SampleResponse>| match r {
        Err(infermux::Error::Engine(EngineError::Invalid(e))) => e,
        other => panic!("{backend}: expected a validation error, got {other:?}"),
    };
    assert_eq!(
        invalid(sample(ModelInput::from_ints(vec![1, vocab]), ok.clone())),
        ValidationError::TokenOutOfRange {
            token: vocab,
            position: 1,
            vocab_size: vocab as usize
        }
    );
    assert_eq!(
        invalid(sample(ModelInput::from_ints(vec![]), ok.clone())),
        ValidationError::EmptyPrompt
    );
    let field = |e: ValidationError| match e {
        ValidationError::InvalidField { field, .. } => field,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        field(invalid(sample(
            ModelInput::from_ints(vec![1]),
            SamplingParams {
                temperature: -0.5,
                ..ok.clone()
            }
        ))),
        "temperature"
    );
    assert_eq!(
        field(invalid(sample(
            ModelInput::from_ints(vec![1]),
            SamplingParams {
                top_p: 0.0,
                ..ok.clone()
            }
        ))),
        "top_p"
    );
    assert_eq!(
        field(invalid(sample(
            ModelInput::from_ints(vec![1]),
            SamplingParams {
                top_p: 1.5,
                ..ok.clone()
            }
        ))),
        "top_p"
    );
    assert!(matches!(
        invalid(sample(
            ModelInput::from_ints(vec![1; 8000]),
            SamplingParams::greedy(500)
        )),
        ValidationError::ContextOverflow {
            prompt_len: 8000,
            max_tokens: 500,
            max_context: 8192
        }
    ));
    let image = ModelInputChunk::Image(ImageChunk {
        data: vec![0xff, 0xd8],
        format: ImageFormat::Jpeg,
        expected_tokens: Some(16),
    });
    assert!(matches!(
        invalid(sample(
            ModelInput::from_ints(vec![1, 2]).with_chunk(image),
            ok.clone()
        )),
        ValidationError::UnsupportedChunk { index: 1, .. }
    ));
    // The engine still serves after all that.
    let fine = sample(ModelInput::from_ints(vec![504, 3458, 314]), ok).unwrap();
    assert_eq!(fine.sequences[0].tokens.len(), 4);
}

fn missing_model_files_are_named(backend: BackendKind) {
    let dir =
        std::env::temp_dir().join(format!("infermux-missing-{backend}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(model_dir().join("config.json"), dir.join("config.json")).unwrap();
    let options = LoadOptions {
        backend,
        ..LoadOptions::default()
    };
    let err = ServiceClient::with_options(options)
        .create_sampling_client(&dir)
        .unwrap_err()
        .to_string();
    let expected = match backend {
        BackendKind::Onnx => "model.onnx",
        _ => "model.safetensors",
    };
    assert!(err.contains(expected), "{backend}: {err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// GGUF files loaded directly (no dequantized folder): candle on each against llama.cpp on the
/// same file. The shipped Q4_1 runs our block kernels; Q8_0 (our kernels) and F16 (widened to
/// f32) are made by `cargo xtask setup` with gguf-py, and their tensors are checked to be the
/// bytes llama.cpp's own quantize call wrote into the file the goldens come from.
mod gguf {
    use super::*;

    /// A step where our logprob of llama.cpp's token is this close to our own choice is a
    /// near-tie: the continuations may part there.
    const NEAR_TIE: f64 = 0.5;

    /// One file's cases: its client, llama.cpp's goldens, the named tolerance.
    macro_rules! gguf_suite {
        ($module:ident, $label:literal, $file:expr, $goldens:expr, $tolerance:expr) => {
            mod $module {
                use super::*;

                pub(super) fn client() -> &'static SamplingClient {
                    static CLIENT: OnceLock<SamplingClient> = OnceLock::new();
                    CLIENT.get_or_init(|| load_from(BackendKind::Candle, &$file))
                }

                fn goldens() -> infermux_tests::Goldens {
                    load_goldens(&repo_root().join($goldens))
                }

                #[test]
                fn candle_prompt_logprobs_match_llama_cpp() {
                    check_prompt_logprobs($label, client(), goldens().cases, $tolerance);
                }

                #[test]
                fn candle_greedy_matches_llama_cpp() {
                    check_greedy(
                        $label,
                        client(),
                        goldens().cases,
                        $tolerance,
                        Some(NEAR_TIE),
                    );
                }

                #[test]
                fn the_file_holds_the_tensors_llama_cpp_ran() {
                    let expected = goldens()
                        .tensor_sha256
                        .expect("llama.cpp goldens record the tensor digest");
                    assert_eq!(gguf_tensor_digest(&$file), expected, $label);
                }
            }
        };
    }

    gguf_suite!(
        q4_1,
        "candle Q4_1",
        gguf_file(),
        LLAMACPP_Q4_1_GOLDENS,
        Tolerance::Q4_VS_LLAMA_CPP
    );
    gguf_suite!(
        q8_0,
        "candle Q8_0",
        derived_gguf_file("Q8_0"),
        LLAMACPP_Q8_0_GOLDENS,
        Tolerance::Q8_VS_LLAMA_CPP
    );
    gguf_suite!(
        f16,
        "candle F16",
        derived_gguf_file("F16"),
        LLAMACPP_F16_GOLDENS,
        Tolerance::F16_VS_LLAMA_CPP
    );

    fn q4_1() -> &'static SamplingClient {
        q4_1::client()
    }

    #[test]
    fn the_gguf_tokenizer_matches_the_reference_folder() {
        check_tokenizer(q4_1());
    }

    /// torch and onnx have no kernels for GGUF's types: a typed error naming where it runs.
    #[test]
    fn other_backends_refuse_gguf_by_name() {
        for backend in BackendKind::ALL
            .into_iter()
            .filter(|b| *b != BackendKind::Candle)
        {
            let options = LoadOptions {
                backend,
                ..LoadOptions::default()
            };
            match ServiceClient::with_options(options).create_sampling_client(gguf_file()) {
                Ok(_) => panic!("{backend} loaded a GGUF file"),
                Err(e) => {
                    let msg = e.to_string();
                    let compiled_out = msg.contains("not compiled") || msg.contains("feature");
                    assert!(
                        msg.contains("GGUF") && (msg.contains("--backend candle") || compiled_out),
                        "{backend}: {msg}"
                    );
                }
            }
        }
    }
}

/// The tiny variants' cases for one backend, as `mod tiny { mod <variant> { #[test] fn .. } }`.
/// The variant list is checked against [`TINY_VARIANTS`] by `tiny_fixtures::variant_list`.
macro_rules! tiny_suite {
    ($backend:expr, $($variant:ident),+) => {
        mod tiny {
            use super::*;
            $(
                mod $variant {
                    use super::*;
                    #[test]
                    fn prompt_logprobs_match_reference() {
                        crate::tiny_prompt_logprobs_match_reference(
                            $backend,
                            stringify!($variant),
                        );
                    }
                    #[test]
                    fn greedy_matches_reference() {
                        crate::tiny_greedy_matches_reference(
                            $backend,
                            stringify!($variant),
                        );
                    }
                }
            )+
        }
    };
}

/// The variants `tiny_suite!` instantiates, in [`TINY_VARIANTS`] order.
const TINY_SUITE_VARIANTS: [&str; 5] = ["llama3", "llamabias", "mistral", "qwen2", "qwen3"];

/// Instantiates every case for one backend, as `mod <backend> { #[test] fn <case>() }`.
macro_rules! conformance_suite {
    ($module:ident, $backend:expr, cross_checked) => {
        conformance_suite!($module, $backend, {
            #[test]
            fn agrees_with_candle() {
                super::agrees_with_candle($backend);
            }
        });
    };
    ($module:ident, $backend:expr) => {
        conformance_suite!($module, $backend, {});
    };
    ($module:ident, $backend:expr, { $($extra:item)* }) => {
        mod $module {
            use super::*;
            $($extra)*
            tiny_suite!($backend, llama3, llamabias, mistral, qwen2, qwen3);
            #[test]
            fn prompt_logprobs_match_reference() {
                super::prompt_logprobs_match_reference($backend);
            }
            #[test]
            fn tokenizer_matches_reference() {
                super::tokenizer_matches_reference($backend);
            }
            #[test]
            fn greedy_matches_reference() {
                super::greedy_matches_reference($backend);
            }
            #[test]
            fn sampled_logprobs_equal_compute_logprobs() {
                super::sampled_logprobs_equal_compute_logprobs($backend);
            }
            #[test]
            fn seeded_samples_are_batch_independent() {
                super::seeded_samples_are_batch_independent($backend);
            }
            #[test]
            fn bad_inputs_get_typed_errors() {
                super::bad_inputs_get_typed_errors($backend);
            }
            #[test]
            fn missing_model_files_are_named() {
                super::missing_model_files_are_named($backend);
            }
        }
    };
}

conformance_suite!(candle, BackendKind::Candle);
#[cfg(feature = "torch")]
conformance_suite!(torch, BackendKind::Torch, cross_checked);
#[cfg(feature = "onnx")]
conformance_suite!(onnx, BackendKind::Onnx, cross_checked);

/// The tiny fixtures themselves: folders, goldens and the core's reading of their configs.
mod tiny_fixtures {
    use infermux_core::model::{Architecture, ModelDir, RopeScaling};
    use infermux_tests::{TINY_FILES, tiny_dir, tiny_goldens_path};
    use serde_json::Value;

    use super::*;

    #[test]
    fn variant_list() {
        assert_eq!(TINY_SUITE_VARIANTS, TINY_VARIANTS);
        let mut folders: Vec<String> =
            std::fs::read_dir(infermux_tests::repo_root().join("tests/data/tiny"))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
        folders.sort();
        assert_eq!(
            folders, TINY_VARIANTS,
            "tests/data/tiny/ holds exactly the variants"
        );
    }

    #[test]
    fn goldens_are_complete_and_labelled() {
        for variant in TINY_VARIANTS {
            let goldens = tiny_goldens(variant);
            let label = format!("tiny-{variant}");
            assert_eq!(goldens.variant.as_deref(), Some(label.as_str()));
            assert!(goldens.cases.len() >= 3, "{variant}");
            assert!(
                goldens.cases.iter().any(|c| c.prompt_tokens.len() >= 128),
                "{variant}: a long prompt (past the llama3 original context)"
            );
            for case in &goldens.cases {
                assert!(case.name.starts_with(&format!("{label}:")), "{}", case.name);
                assert_eq!(case.prompt_logprobs.len(), case.prompt_tokens.len());
                assert!(case.prompt_logprobs[0].is_none());
                assert!(case.prompt_logprobs[1..].iter().all(Option::is_some));
                assert_eq!(case.greedy_tokens.len(), 32, "{}", case.name);
                assert_eq!(case.greedy_logprobs.len(), 32, "{}", case.name);
                assert!(case.prompt_tokens.iter().all(|&t| t < 256));
                let distinct: std::collections::HashSet<_> = case.greedy_tokens.iter().collect();
                assert!(
                    distinct.len() > 1,
                    "{}: degenerate greedy tokens",
                    case.name
                );
            }
            for file in TINY_FILES {
                assert!(tiny_dir(variant).join(file).is_file(), "{variant}/{file}");
            }
        }
    }

    /// What each variant is there to exercise, as the core reads its config.
    #[test]
    fn configs_exercise_their_variant() {
        for variant in TINY_VARIANTS {
            let dir = ModelDir::open(tiny_dir(variant)).unwrap();
            let c = &dir.config;
            assert_eq!(
                (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim),
                (64, 4, 2, 16),
                "{variant}: GQA, head_dim 16"
            );
            assert_eq!((c.num_layers, c.vocab_size), (2, 256), "{variant}");
            assert!(c.max_position_embeddings >= 256, "{variant}");
            let expected = match variant {
                "llama3" => (Architecture::Llama, false, false, false),
                "mistral" => (Architecture::Mistral, false, false, false),
                "qwen2" => (Architecture::Qwen2, true, true, false),
                "qwen3" => (Architecture::Qwen3, true, false, true),
                "llamabias" => (Architecture::Llama, true, true, false),
                other => panic!("unknown variant {other}"),
            };
            assert_eq!(
                (
                    c.architecture,
                    c.tie_word_embeddings,
                    c.attention_bias,
                    c.qk_norm
                ),
                expected,
                "{variant}: (architecture, tied, q/k/v bias, q/k norm)"
            );
            if variant == "llama3" {
                assert!(
                    matches!(c.rope_scaling, RopeScaling::Llama3 { factor, original_max_position_embeddings, .. }
                        if factor == 8.0 && original_max_position_embeddings == 64.0),
                    "{:?}",
                    c.rope_scaling
                );
                assert_eq!(c.rope_theta, 500000.0);
            } else {
                assert_eq!(c.rope_scaling, RopeScaling::None, "{variant}");
            }
        }
    }

    /// The core's RoPE frequencies (llama3 scaling included) against transformers' own.
    #[test]
    fn rope_frequencies_match_transformers() {
        for variant in TINY_VARIANTS {
            let path = tiny_goldens_path(variant);
            let json: Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let reference: Vec<f64> = json["rope_inv_freq"]
                .as_array()
                .unwrap_or_else(|| panic!("{}: no rope_inv_freq", path.display()))
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            let ours = ModelDir::open(tiny_dir(variant))
                .unwrap()
                .config
                .rope_inv_freq();
            assert_eq!(ours.len(), reference.len(), "{variant}");
            for (i, (&a, &b)) in ours.iter().zip(&reference).enumerate() {
                let rel = (a as f64 - b).abs() / b;
                assert!(
                    rel <= 1e-6,
                    "{variant}: inv_freq[{i}] = {a:e}, transformers {b:e} (relative {rel:e})"
                );
            }
        }
    }
}
