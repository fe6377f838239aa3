//! Hostile requests and misbehaving parts: client numbers at their extremes, NaN/inf logits,
//! panicking constraints and backends, stats during a long forward, streams refused at submit.
//! Each test checks the engine still serves a normal request afterwards with every slot free.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::fields::{EvenDecoder, Letters};
use super::*;
use crate::engine::BeamSearchRequest;
use crate::guided::{GuidedDecoder, GuidedDecodingParams, GuidedError, TokenConstraint, TokenMask};
use crate::params::{BeamSearchParams, OutputKind};

/// Every slot is free, nothing is reserved, running or waiting, and nothing is allocated but
/// the prefixes the prefix cache keeps.
fn assert_all_free(e: &Engine) {
    let stats = e.stats().unwrap();
    assert_eq!(
        (
            stats.free_slots,
            stats.running_requests,
            stats.waiting_requests,
            stats.kv_reserved_bytes,
            stats.kv_allocated_bytes
        ),
        (stats.total_slots, 0, 0, 0, stats.prefix_cache_bytes),
        "{stats:?}"
    );
}

/// A normal request is served.
fn assert_serves(e: &Engine) {
    let out = e
        .generate(GenerateRequest::new(vec![1, 2], SamplingParams::greedy(3)))
        .wait()
        .unwrap();
    assert_eq!(out.sequences[0].tokens.len(), 3);
}

fn field_of(err: EngineError) -> &'static str {
    match err {
        EngineError::Invalid(ValidationError::InvalidField { field, .. }) => field,
        other => panic!("expected a field error, got {other:?}"),
    }
}

fn image(expected_tokens: Option<usize>) -> ModelInputChunk {
    ModelInputChunk::Image(ImageChunk {
        data: vec![0xFF, 0xD8],
        format: ImageFormat::Jpeg,
        expected_tokens,
    })
}

#[test]
fn client_numbers_at_their_extremes_are_typed_errors() {
    let (e, counters) = engine(EngineConfig {
        max_num_seqs: 8,
        max_num_batched_tokens: 16,
        ..EngineConfig::default()
    });
    let generate = |prompt: Vec<TokenId>, params: SamplingParams| {
        e.generate(GenerateRequest::new(prompt, params)).wait()
    };
    // max_tokens whose sum with the prompt overflows: a context error, not a wrap past it.
    for max in [usize::MAX, usize::MAX - 1, usize::MAX / 2 + 1] {
        let err = generate(vec![1, 2], SamplingParams::greedy(max)).unwrap_err();
        assert_eq!(
            err,
            EngineError::Invalid(ValidationError::ContextOverflow {
                prompt_len: 2,
                max_tokens: max,
                max_context: 64
            })
        );
        // Its message (which adds the two) saturates instead of overflowing.
        let message = err.to_string();
        let sum = 2usize.saturating_add(max);
        assert!(message.contains(&format!("= {sum} exceeds")), "{message}");
    }
    // Images with any expected_tokens are rejected before anything is counted or allocated.
    for expected in [Some(usize::MAX), Some(usize::MAX / 2 + 1), None] {
        let prompt = ModelInput::default()
            .with_chunk(image(expected))
            .with_chunk(image(expected))
            .with_chunk(ModelInputChunk::EncodedText { tokens: vec![1] });
        let unsupported = EngineError::Invalid(ValidationError::UnsupportedChunk {
            index: 0,
            kind: "an image chunk",
        });
        let request = GenerateRequest {
            prompt: prompt.clone(),
            ..GenerateRequest::new(vec![], SamplingParams::greedy(2))
        };
        assert_eq!(e.generate(request.clone()).wait().unwrap_err(), unsupported);
        assert_eq!(
            e.generate_stream(request).take_rejection(),
            Some(unsupported.clone())
        );
        assert_eq!(e.score(&prompt).wait().unwrap_err(), unsupported);
        let beams = BeamSearchRequest {
            prompt,
            params: BeamSearchParams::new(2, 2),
        };
        assert_eq!(e.beam_search(beams).wait().unwrap_err(), unsupported);
    }
    // Counts: samples, beams (2 × width overflows), logprobs, prompt logprobs, bias keys.
    let with = |f: fn(&mut SamplingParams)| {
        let mut p = sampled(1.0, 1, 2);
        f(&mut p);
        generate(vec![1], p)
    };
    assert_eq!(field_of(with(|p| p.n = usize::MAX).unwrap_err()), "n");
    assert_eq!(
        field_of(with(|p| p.best_of = Some(usize::MAX)).unwrap_err()),
        "best_of"
    );
    assert_eq!(
        field_of(with(|p| p.logprobs = Some(usize::MAX)).unwrap_err()),
        "logprobs"
    );
    assert_eq!(
        field_of(with(|p| p.prompt_logprobs = Some(usize::MAX)).unwrap_err()),
        "prompt_logprobs"
    );
    assert_eq!(
        field_of(with(|p| p.logit_bias = Some([(u32::MAX, 1.0)].into())).unwrap_err()),
        "logit_bias"
    );
    assert_eq!(
        field_of(with(|p| p.stop_token_ids = vec![u32::MAX]).unwrap_err()),
        "stop_token_ids"
    );
    let wide = GenerateRequest {
        prompt_logprobs: PromptLogprobs {
            include: true,
            top_k: usize::MAX,
        },
        ..GenerateRequest::new(vec![1], sampled(1.0, 1, 2))
    };
    assert_eq!(
        field_of(e.generate(wide).wait().unwrap_err()),
        "topk_prompt_logprobs"
    );
    let beam = |width: usize, max_tokens: usize| {
        e.beam_search(BeamSearchRequest {
            prompt: vec![1, 2].into(),
            params: BeamSearchParams::new(width, max_tokens),
        })
        .wait()
    };
    for width in [usize::MAX, usize::MAX / 2 + 1, 5] {
        assert_eq!(field_of(beam(width, 2).unwrap_err()), "beam_width");
    }
    assert!(matches!(
        beam(2, usize::MAX).unwrap_err(),
        EngineError::Invalid(ValidationError::ContextOverflow { .. })
    ));
    let cold = BeamSearchParams {
        temperature: 1e-45,
        ..BeamSearchParams::new(2, 2)
    };
    let err = e
        .beam_search(BeamSearchRequest {
            prompt: vec![1].into(),
            params: cold,
        })
        .wait()
        .unwrap_err();
    assert_eq!(field_of(err), "temperature");
    // Extremes that are valid are served: a huge truncation, seed and min_tokens (max_tokens
    // unset: runs to the context's end), a tiny temperature (greedy in the limit).
    let out = with(|p| {
        p.truncate_prompt_tokens = Some(usize::MAX);
        p.seed = Some(u64::MAX);
    })
    .unwrap();
    assert_eq!(out.sequences[0].tokens.len(), 2);
    let long = generate(
        vec![1; 60],
        SamplingParams {
            max_tokens: None,
            min_tokens: usize::MAX,
            ..sampled(1.0, 2, 1)
        },
    )
    .unwrap();
    assert_eq!(long.sequences[0].tokens.len(), 4);
    let cold = with(|p| p.temperature = 1e-45).unwrap();
    let greedy = generate(vec![1], SamplingParams::greedy(2)).unwrap();
    assert_eq!(cold.sequences[0].tokens, greedy.sequences[0].tokens);
    assert_serves(&e);
    assert_all_free(&e);
    // Nothing rejected reached the backend: only the served requests' tokens did.
    assert!(counters.tokens.load(Ordering::Relaxed) < 200);
}

/// Prompts starting with these tokens make the fake model misbehave (see `misbehaving`).
const NAN_AT_PREFILL: TokenId = 28;
const INF_AT_DECODE: TokenId = 27;
const ALL_NEG_INF: TokenId = 26;
const NAN_IN_PROMPT: TokenId = 25;
const NAN_AFTER_PROMPT: TokenId = 24;

/// The row values the misbehaving model returns for a slot's history.
fn misbehaving(history: &[TokenId]) -> Option<f32> {
    match *history.first()? {
        NAN_AT_PREFILL => Some(f32::NAN),
        INF_AT_DECODE if history.len() >= 5 => Some(f32::INFINITY),
        ALL_NEG_INF => Some(f32::NEG_INFINITY),
        // Only the row at position 1, which predicts prompt position 2.
        NAN_IN_PROMPT if history.len() == 2 => Some(f32::NAN),
        // Only the row at position 3: the last of a 4-token prompt, which predicts what follows.
        NAN_AFTER_PROMPT if history.len() == 4 => Some(f32::NAN),
        _ => None,
    }
}

#[test]
fn non_finite_logits_fail_only_their_request_and_free_its_slots() {
    let (mut backend, counters, gate) = FakeBackend::gated(64);
    backend.bad_rows = Some(misbehaving);
    let e = Engine::start(
        backend,
        EngineConfig {
            max_num_seqs: 8,
            max_num_batched_tokens: 64,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    let generate = |prompt: Vec<TokenId>, params: SamplingParams| {
        e.generate(GenerateRequest::new(prompt, params))
    };
    // All queued before the first step ends, so they share batches.
    let nan = generate(vec![NAN_AT_PREFILL, 1, 2], sampled(1.0, 1, 5));
    let healthy = generate(vec![1, 2], sampled(1.0, 2, 8));
    let inf = generate(
        vec![INF_AT_DECODE, 1, 2],
        SamplingParams {
            n: 2,
            ..sampled(1.0, 3, 8)
        },
    );
    let neg = generate(vec![ALL_NEG_INF, 3], SamplingParams::greedy(2));
    drop(gate);
    // The first request admitted gets the first slot handed out.
    assert_eq!(
        nan.wait().unwrap_err(),
        EngineError::Backend(BackendError::NonFiniteLogits {
            slot: SlotId(0),
            position: 2,
            found: "NaN"
        })
    );
    let inf = inf.wait().unwrap_err();
    assert!(
        matches!(
            inf,
            EngineError::Backend(BackendError::NonFiniteLogits {
                position: 4,
                found: "+inf",
                ..
            })
        ),
        "{inf}"
    );
    assert!(inf.to_string().contains("+inf"), "{inf}");
    assert!(matches!(
        neg.wait().unwrap_err(),
        EngineError::Backend(BackendError::NonFiniteLogits {
            position: 1,
            found: "only -inf",
            ..
        })
    ),);
    // The request that shared their batches is unaffected.
    let healthy = healthy.wait().unwrap();
    assert_eq!(healthy.sequences[0].tokens.len(), 8);
    // Only rows that are used count: a bad row the request neither samples nor scores is fine.
    // Scoring computes every prompt row but uses none past the prompt's last token.
    let scored = e.score(&vec![NAN_AFTER_PROMPT, 1, 2, 3].into()).wait();
    assert_eq!(scored.unwrap().prompt_logprobs.unwrap().len(), 4);
    assert!(matches!(
        generate(vec![NAN_AFTER_PROMPT, 1, 2, 3], SamplingParams::greedy(2))
            .wait()
            .unwrap_err(),
        EngineError::Backend(BackendError::NonFiniteLogits { position: 3, .. })
    ));
    let unused = generate(vec![NAN_IN_PROMPT, 1, 2, 3], SamplingParams::greedy(2));
    assert_eq!(unused.wait().unwrap().sequences[0].tokens.len(), 2);
    let scored = GenerateRequest {
        prompt_logprobs: PromptLogprobs {
            include: true,
            top_k: 0,
        },
        ..GenerateRequest::new(vec![NAN_IN_PROMPT, 1, 2, 3], SamplingParams::greedy(2))
    };
    assert!(matches!(
        e.generate(scored).wait().unwrap_err(),
        EngineError::Backend(BackendError::NonFiniteLogits { position: 1, .. })
    ));
    assert!(matches!(
        e.score(&vec![NAN_IN_PROMPT, 1, 2, 3].into())
            .wait()
            .unwrap_err(),
        EngineError::Backend(BackendError::NonFiniteLogits { position: 1, .. })
    ));
    assert_serves(&e);
    assert_all_free(&e);
    let stats = e.stats().unwrap();
    assert_eq!(stats.failed_requests_total, 6, "{stats:?}");
    assert!(counters.tokens.load(Ordering::Relaxed) > 0);
}

/// Compiles `mask-panic`, `commit-panic` and `fork-panic` into constraints that panic there,
/// and `even` into [`EvenOnly`].
struct PanickyDecoder;

struct Panicky {
    at: &'static str,
}

impl TokenConstraint for Panicky {
    fn compute_mask(&mut self, mask: &mut TokenMask) -> Result<(), GuidedError> {
        assert_ne!(self.at, "mask", "constraint bug in compute_mask");
        (0..VOCAB as TokenId).for_each(|t| mask.allow(t));
        Ok(())
    }
    fn commit(&mut self, _: TokenId) -> Result<(), GuidedError> {
        assert_ne!(self.at, "commit", "constraint bug in commit");
        Ok(())
    }
    fn is_finished(&self) -> bool {
        false
    }
    fn fork(&self) -> Box<dyn TokenConstraint> {
        assert_ne!(self.at, "fork", "constraint bug in fork");
        Box::new(Panicky { at: self.at })
    }
}

impl GuidedDecoder for PanickyDecoder {
    fn compile(
        &self,
        params: &GuidedDecodingParams,
        vocab_size: usize,
    ) -> Result<Box<dyn TokenConstraint>, GuidedError> {
        match params.regex.as_deref() {
            Some("mask-panic") => Ok(Box::new(Panicky { at: "mask" })),
            Some("commit-panic") => Ok(Box::new(Panicky { at: "commit" })),
            Some("fork-panic") => Ok(Box::new(Panicky { at: "fork" })),
            _ => EvenDecoder.compile(params, vocab_size),
        }
    }
}

#[test]
fn a_panicking_constraint_fails_its_request_and_the_engine_keeps_serving() {
    let (backend, _, gate) = FakeBackend::gated(64);
    let tools = EngineTools {
        codec: Some(Arc::new(Letters)),
        guided: Some(Arc::new(PanickyDecoder)),
    };
    let config = EngineConfig {
        max_num_seqs: 8,
        ..EngineConfig::default()
    };
    let e = Engine::start_with(backend, config, tools).unwrap();
    let guided = |regex: &str, n: usize| {
        let params = SamplingParams {
            n,
            guided_decoding: Some(GuidedDecodingParams::regex(regex)),
            ..sampled(1.0, 7, 4)
        };
        e.generate(GenerateRequest::new(vec![1, 2], params))
    };
    let plain = e.generate(GenerateRequest::new(vec![3, 4], sampled(1.0, 8, 6)));
    let in_mask = guided("mask-panic", 1);
    let in_commit = guided("commit-panic", 2);
    let in_fork = guided("fork-panic", 2);
    let even = guided("even", 2);
    drop(gate);
    let stage = |r: Result<GenerateOutput, EngineError>| match r {
        Err(EngineError::Panicked { stage, message }) => {
            assert!(message.contains("constraint bug"), "{message}");
            stage
        }
        other => panic!("expected a caught panic, got {other:?}"),
    };
    assert!(stage(in_mask.wait()).contains("mask"));
    assert!(stage(in_commit.wait()).contains("accepting"));
    assert!(stage(in_fork.wait()).contains("logits"));
    // The requests that shared their batches are served.
    assert_eq!(plain.wait().unwrap().sequences[0].tokens.len(), 6);
    let even = even.wait().unwrap();
    assert!(
        even.sequences
            .iter()
            .flat_map(|s| &s.tokens)
            .all(|t| t % 2 == 0 || *t == EOS)
    );
    // And so is a later one, guided or not.
    assert_eq!(guided("even", 1).wait().unwrap().sequences.len(), 1);
    assert_serves(&e);
    assert_all_free(&e);
}

#[test]
fn a_panic_outside_every_guard_fails_the_running_requests_and_resets_the_slots() {
    let (backend, counters) = FakeBackend::new(64);
    let e = Engine::start(backend, EngineConfig::default()).unwrap();
    // The backend panics when the finished request's slot is released, after its forward.
    counters.panic_on_release.store(true, Ordering::Relaxed);
    let err = e
        .generate(GenerateRequest::new(vec![1, 2], SamplingParams::greedy(2)))
        .wait()
        .unwrap_err();
    match err {
        EngineError::Panicked { stage, message } => {
            assert!(stage.contains("scheduling step"), "{stage}");
            assert!(message.contains("fake release bug"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_serves(&e);
    assert_all_free(&e);
    assert_eq!(e.stats().unwrap().failed_requests_total, 1);
}

#[test]
fn stats_answer_at_once_during_a_long_forward() {
    let (mut backend, counters) = FakeBackend::new(64);
    backend.delay = Some(Duration::from_secs(2));
    let e = Engine::start(backend, EngineConfig::default()).unwrap();
    let first = e.generate(GenerateRequest::new(vec![1, 2], SamplingParams::greedy(1)));
    // Wait until the engine is inside the first (2 s) forward.
    let t0 = Instant::now();
    while counters.steps.load(Ordering::Relaxed) == 0 {
        assert!(t0.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut slowest = Duration::ZERO;
    let mut stats = None;
    for _ in 0..100 {
        let t = Instant::now();
        stats = Some(e.stats().unwrap());
        slowest = slowest.max(t.elapsed());
    }
    assert!(
        slowest < Duration::from_millis(50),
        "stats took {slowest:?}"
    );
    eprintln!("stats during a 2 s forward: slowest of 100 calls {slowest:?}");
    let stats = stats.unwrap();
    // Published after admission, before the forward: the request shows as running.
    assert_eq!(
        (stats.running_requests, stats.waiting_requests),
        (1, 0),
        "{stats:?}"
    );
    // A submission counts as waiting at once, while the engine is still in the forward.
    let second = e.generate(GenerateRequest::new(vec![3], SamplingParams::greedy(1)));
    let t = Instant::now();
    let stats = e.stats().unwrap();
    assert!(t.elapsed() < Duration::from_millis(50));
    assert_eq!(stats.waiting_requests, 1, "{stats:?}");
    assert!(
        counters.steps.load(Ordering::Relaxed) == 1,
        "still in step 1"
    );
    first.wait().unwrap();
    second.wait().unwrap();
    assert_all_free(&e);
    assert_eq!(e.stats().unwrap().finished_requests_total, 2);
}

#[test]
fn stats_and_submissions_report_shutdown_once_the_engine_thread_is_gone() {
    let (backend, counters) = FakeBackend::new(64);
    let e = Engine::start(backend, EngineConfig::default()).unwrap();
    assert_serves(&e);
    // The engine thread dies publishing its stats after it drains the next submission.
    counters.panic_on_kv_usage.store(true, Ordering::Relaxed);
    let lost = e.generate(GenerateRequest::new(vec![1], SamplingParams::greedy(1)));
    assert_eq!(lost.wait().unwrap_err(), EngineError::Shutdown);
    let t0 = Instant::now();
    while e.stats().is_ok() {
        assert!(t0.elapsed() < Duration::from_secs(5), "stats still answer");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(e.stats().unwrap_err(), EngineError::Shutdown);
    assert_eq!(
        e.generate(GenerateRequest::new(vec![1], SamplingParams::greedy(1)))
            .wait()
            .unwrap_err(),
        EngineError::Shutdown
    );
    let mut stream = e.generate_stream(GenerateRequest::new(vec![1], SamplingParams::greedy(1)));
    assert_eq!(stream.take_rejection(), Some(EngineError::Shutdown));
    assert!(stream.next().is_none());
}

#[test]
fn streams_refused_at_submit_hand_their_error_to_take_rejection() {
    let budget = 1 << 20;
    let (backend, counters) = FakeBackend::new(256);
    let config = EngineConfig {
        max_num_seqs: 8,
        max_num_batched_tokens: 64,
        kv_budget_bytes: Some(budget),
        prefix_caching: true,
        max_loras: 8,
    };
    let e = Engine::start(backend, config).unwrap();
    let stream = |prompt: Vec<TokenId>, params: SamplingParams| {
        e.generate_stream(GenerateRequest::new(prompt, params))
    };
    // Invalid parameters.
    let mut bad = stream(
        vec![1],
        SamplingParams {
            temperature: -1.0,
            ..SamplingParams::greedy(2)
        },
    );
    assert_eq!(field_of(bad.take_rejection().unwrap()), "temperature");
    assert_eq!(bad.take_rejection(), None, "taken once");
    assert!(bad.next().is_none(), "nothing else comes");
    // best_of > n cannot stream.
    let mut best_of = stream(
        vec![1],
        SamplingParams {
            best_of: Some(2),
            ..sampled(1.0, 1, 2)
        },
    );
    assert_eq!(field_of(best_of.take_rejection().unwrap()), "best_of");
    // Prompt errors, context overflow.
    let mut empty = stream(vec![], SamplingParams::greedy(2));
    assert_eq!(
        empty.take_rejection(),
        Some(EngineError::Invalid(ValidationError::EmptyPrompt))
    );
    let mut long = stream(vec![1; 250], SamplingParams::greedy(10));
    assert!(matches!(
        long.take_rejection(),
        Some(EngineError::Invalid(
            ValidationError::ContextOverflow { .. }
        ))
    ));
    // A KV reservation past the whole budget.
    let mut huge = stream(
        vec![1; 10],
        SamplingParams {
            n: 8,
            ..sampled(1.0, 2, 200)
        },
    );
    assert!(matches!(
        huge.take_rejection(),
        Some(EngineError::Invalid(
            ValidationError::KvBudgetExceeded { .. }
        ))
    ));
    assert_eq!(counters.tokens.load(Ordering::Relaxed), 0, "none ran");
    // An accepted stream has no rejection and streams to its end.
    let mut ok = stream(vec![1, 2], sampled(1.0, 3, 4));
    assert_eq!(ok.take_rejection(), None);
    let updates: Vec<StreamUpdate> = ok.map(Result::unwrap).collect();
    assert!(updates.last().unwrap().finished);
    assert_eq!(updates.last().unwrap().sequences[0].tokens.len(), 4);
    assert_all_free(&e);
}

#[test]
fn a_stop_pattern_that_cuts_streamed_text_ends_the_stream_cleanly() {
    let (backend, _) = FakeBackend::new(64);
    let tools = EngineTools {
        codec: Some(Arc::new(Letters)),
        guided: None,
    };
    let e = Engine::start_with(backend, EngineConfig::default(), tools).unwrap();
    // Letters only, so every token is text; the pattern first matches at the third letter,
    // from the start of text the stream has already shown.
    let params = SamplingParams {
        stop_pattern: Some("[a-z]{3}".into()),
        allowed_token_ids: Some((0..26).collect()),
        output_kind: OutputKind::Delta,
        ..sampled(1.0, 5, 10)
    };
    for kind in [OutputKind::Delta, OutputKind::Cumulative] {
        let params = SamplingParams {
            output_kind: kind,
            ..params.clone()
        };
        let updates: Vec<StreamUpdate> = e
            .generate_stream(GenerateRequest::new(vec![1, 2], params.clone()))
            .map(Result::unwrap)
            .collect();
        let last = updates.last().unwrap();
        assert!(last.finished, "{updates:?}");
        let seq = &last.sequences[0];
        assert_eq!(
            seq.finish_reason,
            Some(FinishReason::StopString),
            "{updates:?}"
        );
        assert_eq!(
            seq.tokens.len(),
            if kind == OutputKind::Delta { 1 } else { 3 }
        );
        let streamed: String = updates
            .iter()
            .flat_map(|u| &u.sequences)
            .map(|s| s.text.as_str())
            .collect();
        assert!(!streamed.is_empty(), "text was shown before the match");
        // The final reply agrees with the non-streamed request: the match is cut.
        let out = e
            .generate(GenerateRequest::new(vec![1, 2], params))
            .wait()
            .unwrap();
        assert_eq!(out.sequences[0].text.as_deref(), Some(""));
        if kind == OutputKind::Cumulative {
            assert_eq!(seq.text, "");
        }
    }
    assert_serves(&e);
    assert_all_free(&e);
}
