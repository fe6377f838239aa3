//! The conformance suite: the same cases for every backend compiled in. A backend can only get
//! its logits wrong, and these cases check logits (against Hugging Face transformers), and what
//! the engine builds on them, on the real reference model.

use std::sync::OnceLock;

use infermux::{
    BackendKind, EngineError, ImageChunk, ImageFormat, LoadOptions, ModelInput, ModelInputChunk,
    SamplingClient, SamplingParams, ServiceClient, ValidationError,
};
use infermux_tests::{Tolerance, goldens, model_dir};

fn load(backend: BackendKind) -> SamplingClient {
    let options = LoadOptions {
        backend,
        ..LoadOptions::default()
    };
    ServiceClient::with_options(options)
        .create_sampling_client(model_dir())
        .expect("loading the reference model")
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

fn prompt_logprobs_match_reference(backend: BackendKind) {
    let client = shared(backend);
    let pending: Vec<_> = goldens()
        .cases
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
        let worst = Tolerance::F32_VS_REFERENCE.check(
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
    let tokenizer = shared(backend).get_tokenizer();
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
    let client = shared(backend);
    let params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(32)
    };
    let pending: Vec<_> = goldens()
        .cases
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
        assert_eq!(
            seq.tokens, case.greedy_tokens,
            "{backend} {}: greedy continuation differs",
            case.name
        );
        let got: Vec<f64> = seq.logprobs.unwrap().iter().map(|&x| x as f64).collect();
        Tolerance::F32_VS_REFERENCE.check(
            &format!("{backend} {} greedy logprobs", case.name),
            &got,
            &case.greedy_logprobs,
        );
    }
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
