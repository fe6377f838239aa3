//! Property test: arbitrary sampling parameters (numbers at their extremes included) and
//! arbitrary prompts (images with any `expected_tokens`, out-of-range ids) through every entry
//! point of one engine. Nothing panics, every error is a typed validation error, and after each
//! case the engine serves a normal request with every KV slot free.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicUsize;
use std::time::Instant;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use super::fields::{EvenDecoder, Letters};
use super::*;
use crate::engine::BeamSearchRequest;
use crate::guided::GuidedDecodingParams;
use crate::params::{BeamSearchParams, LogprobsMode, OutputKind};

/// Property cases run; each goes through generate, generate_stream, score and beam_search.
const CASES: u32 = 1024;

fn extreme_usize() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => 0usize..80,
        1 => Just(usize::MAX),
        1 => Just(usize::MAX - 1),
        1 => Just(usize::MAX / 2 + 1),
        1 => Just(u32::MAX as usize + 1),
        1 => any::<usize>(),
    ]
}

/// Mostly `lo..hi` (so cases get past validation), sometimes extreme.
fn count(lo: usize, hi: usize) -> impl Strategy<Value = usize> {
    prop_oneof![24 => lo..hi, 1 => extreme_usize()]
}

/// Mostly in `[lo, hi]`, sometimes extreme.
fn float_in(lo: f32, hi: f32) -> impl Strategy<Value = f32> {
    prop_oneof![24 => lo..=hi, 1 => extreme_f32()]
}

/// Mostly short lowercase words (what the fake tokenizer encodes), sometimes anything.
fn word() -> impl Strategy<Value = String> {
    prop_oneof![16 => "[a-z]{1,3}", 1 => "[a-z ?é]{0,3}"]
}

/// Usually `None` (the field's default), sometimes a value.
fn maybe<T: std::fmt::Debug + Clone>(
    s: impl Strategy<Value = T>,
) -> impl Strategy<Value = Option<T>> {
    prop_oneof![3 => Just(None), 1 => s.prop_map(Some)]
}

fn extreme_f32() -> impl Strategy<Value = f32> {
    prop_oneof![
        6 => -3.0f32..3.0,
        1 => Just(0.0f32),
        1 => Just(1.0f32),
        1 => Just(f32::NAN),
        1 => Just(f32::INFINITY),
        1 => Just(f32::NEG_INFINITY),
        1 => Just(1e-45f32),
        1 => Just(f32::MAX),
        1 => any::<f32>(),
    ]
}

fn token() -> impl Strategy<Value = TokenId> {
    prop_oneof![
        400 => 0..VOCAB as TokenId,
        1 => Just(VOCAB as TokenId),
        1 => Just(TokenId::MAX),
        1 => any::<TokenId>(),
    ]
}

fn chunk() -> impl Strategy<Value = ModelInputChunk> {
    prop_oneof![
        16 => prop::collection::vec(token(), 0..30)
            .prop_map(|tokens| ModelInputChunk::EncodedText { tokens }),
        1 => prop::option::of(extreme_usize()).prop_map(|expected_tokens| {
            ModelInputChunk::Image(ImageChunk {
                data: vec![0x89, b'P'],
                format: ImageFormat::Png,
                expected_tokens,
            })
        }),
    ]
}

fn input() -> impl Strategy<Value = ModelInput> {
    prop::collection::vec(chunk(), 1..4).prop_map(|chunks| ModelInput { chunks })
}

fn params() -> impl Strategy<Value = SamplingParams> {
    let counts = (
        count(1, 4),
        maybe(count(1, 4)),
        prop::option::of(count(1, 24)),
        count(0, 2),
        maybe(count(0, 5)),
        maybe(count(0, 5)),
        prop::option::of(count(1, 40)),
    );
    let floats = (
        float_in(-2.0, 2.0),
        float_in(-2.0, 2.0),
        float_in(0.5, 2.0),
        float_in(0.0, 3.0),
        float_in(0.05, 1.0),
        float_in(0.0, 1.0),
        prop_oneof![3 => -2i32..40, 1 => any::<i32>()],
    );
    let lists = (
        prop::option::of(any::<u64>()),
        prop::collection::vec(word(), 0..3),
        prop::collection::vec(token(), 0..3),
        prop::collection::vec(word(), 0..2),
        maybe(prop::collection::btree_map(
            token(),
            float_in(-100.0, 100.0),
            0..3,
        )),
        maybe(prop::collection::vec(token(), 0..4)),
        maybe(prop_oneof![3 => Just("even"), 1 => Just("odd")]),
        maybe(prop_oneof![3 => "[a-z]{1,3}", 1 => "[a-z.*+(]{0,4}"]),
    );
    let flags = (
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        prop_oneof![
            Just(OutputKind::Cumulative),
            Just(OutputKind::Delta),
            Just(OutputKind::FinalOnly)
        ],
        prop_oneof![Just(LogprobsMode::Raw), Just(LogprobsMode::RawAndProcessed)],
    );
    (counts, floats, lists, flags).prop_map(
        |(
            (n, best_of, max_tokens, min_tokens, logprobs, prompt_logprobs, truncate),
            (presence, frequency, repetition, temperature, top_p, min_p, top_k),
            (seed, stop, stop_token_ids, bad_words, logit_bias, allowed, guided, pattern),
            (ignore_eos, detokenize, include_stop, output_kind, logprobs_mode),
        )| SamplingParams {
            n,
            best_of,
            presence_penalty: presence,
            frequency_penalty: frequency,
            repetition_penalty: repetition,
            temperature,
            top_p,
            min_p,
            top_k,
            seed,
            stop,
            stop_token_ids,
            stop_pattern: pattern,
            bad_words,
            ignore_eos,
            max_tokens,
            min_tokens,
            logprobs,
            prompt_logprobs,
            detokenize,
            skip_special_tokens: true,
            spaces_between_special_tokens: true,
            include_stop_str_in_output: include_stop,
            output_kind,
            truncate_prompt_tokens: truncate,
            guided_decoding: guided.map(GuidedDecodingParams::regex),
            logit_bias,
            allowed_token_ids: allowed,
            extra_args: BTreeMap::new(),
            logprobs_mode,
        },
    )
}

fn beam_params() -> impl Strategy<Value = BeamSearchParams> {
    (
        count(1, 4),
        count(1, 12),
        any::<bool>(),
        float_in(0.0, 2.0),
        float_in(-1.0, 2.0),
    )
        .prop_map(
            |(beam_width, max_tokens, ignore_eos, temperature, length_penalty)| BeamSearchParams {
                beam_width,
                max_tokens,
                ignore_eos,
                temperature,
                length_penalty,
                include_stop_str_in_output: false,
            },
        )
}

fn prompt_logprobs() -> impl Strategy<Value = PromptLogprobs> {
    (any::<bool>(), count(0, 4)).prop_map(|(include, top_k)| PromptLogprobs { include, top_k })
}

/// What a validation error is about: its field, or its kind.
fn reason(err: &ValidationError) -> String {
    match err {
        ValidationError::InvalidField { field, .. } => (*field).to_string(),
        other => format!("{other:?}")
            .split([' ', '{', '('])
            .next()
            .unwrap_or("")
            .into(),
    }
}

/// `Ok`, or the typed validation error every rejection must be.
fn check<T>(what: &str, r: &Result<T, EngineError>) -> Result<(), TestCaseError> {
    match r {
        Ok(_) | Err(EngineError::Invalid(_)) => Ok(()),
        Err(other) => Err(TestCaseError::fail(format!(
            "{what}: not a validation error: {other:?}"
        ))),
    }
}

#[test]
fn hostile_parameters_and_prompts_never_panic_and_leave_no_slot_held() {
    // A small context and KV budget, so prompts overflow and reservations exceed the budget.
    let (mut backend, _) = FakeBackend::new(64);
    // Sampled tokens are arbitrary here: no token may fail the forward.
    backend.poison = false;
    let config = EngineConfig {
        max_num_seqs: 8,
        max_num_batched_tokens: 16,
        kv_budget_bytes: Some(4 * 128 * KV_BYTES_PER_TOKEN),
        prefix_caching: true,
        max_loras: 8,
    };
    let tools = EngineTools {
        codec: Some(Arc::new(Letters)),
        guided: Some(Arc::new(EvenDecoder)),
    };
    let e = Engine::start_with(backend, config, tools).unwrap();
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    });
    // Requests served (not rejected) per entry point: generate, stream, score, beam search.
    let served: [AtomicUsize; 4] = Default::default();
    // Why generate requests were rejected, by field or error kind.
    let reasons = Mutex::new(BTreeMap::<String, usize>::new());
    let count_ok = |i: usize, ok: bool| {
        if ok {
            served[i].fetch_add(1, Ordering::Relaxed);
        }
    };
    let t0 = Instant::now();
    let strategy = (input(), params(), prompt_logprobs(), beam_params());
    runner
        .run(&strategy, |(prompt, params, prompt_lp, beam)| {
            let request = GenerateRequest {
                prompt: prompt.clone(),
                params,
                prompt_logprobs: prompt_lp,
            };
            let out = e.generate(request.clone()).wait();
            check("generate", &out)?;
            if let Err(EngineError::Invalid(err)) = &out {
                *reasons.lock().unwrap().entry(reason(err)).or_insert(0usize) += 1;
            }
            count_ok(0, out.is_ok());
            let mut stream = e.generate_stream(request);
            match stream.take_rejection() {
                Some(err) => check::<()>("generate_stream rejection", &Err(err))?,
                None => {
                    count_ok(1, true);
                    let updates: Vec<_> = stream.collect();
                    for u in &updates {
                        check("generate_stream update", u)?;
                    }
                    // Constraints that contradict only later (a grammar state no listed
                    // token satisfies) end the stream with their typed error (checked above).
                    prop_assert!(
                        updates
                            .last()
                            .is_some_and(|u| u.as_ref().map_or(true, |u| u.finished)),
                        "an accepted stream ends with a finished update or an error: {updates:?}"
                    );
                }
            }
            let scored = e.score(&prompt).wait();
            check("score", &scored)?;
            count_ok(2, scored.is_ok());
            let beams = e
                .beam_search(BeamSearchRequest {
                    prompt,
                    params: beam,
                })
                .wait();
            check("beam_search", &beams)?;
            count_ok(3, beams.is_ok());
            // The engine still serves, and every slot and byte is back.
            let normal = e
                .generate(GenerateRequest::new(vec![1, 2], SamplingParams::greedy(2)))
                .wait();
            prop_assert!(normal.is_ok(), "{normal:?}");
            let stats = e
                .stats()
                .map_err(|err| TestCaseError::fail(err.to_string()))?;
            prop_assert_eq!(stats.free_slots, stats.total_slots, "{:?}", stats);
            prop_assert_eq!(stats.kv_reserved_bytes, 0, "{:?}", stats);
            // What is still allocated is exactly what the prefix cache holds, and within budget.
            prop_assert_eq!(
                stats.kv_allocated_bytes,
                stats.prefix_cache_bytes,
                "{:?}",
                stats
            );
            prop_assert!(
                stats.prefix_cache_bytes <= stats.kv_budget_bytes,
                "{:?}",
                stats
            );
            prop_assert_eq!(stats.running_requests + stats.waiting_requests, 0);
            let dropped = e
                .flush_prefix_cache()
                .wait()
                .map_err(|err| TestCaseError::fail(err.to_string()))?;
            prop_assert_eq!(dropped, stats.prefix_cache_entries);
            let flushed = e
                .stats()
                .map_err(|err| TestCaseError::fail(err.to_string()))?;
            prop_assert_eq!(flushed.kv_allocated_bytes, 0, "{:?}", flushed);
            Ok(())
        })
        .unwrap();
    let stats = e.stats().unwrap();
    let served = served.map(|n| n.into_inner());
    eprintln!(
        "hostile property test: {CASES} cases in {:.2?}; served (not rejected) by generate, \
         generate_stream, score, beam_search: {served:?}; {} requests finished in all; \
         generate rejections: {:?}",
        t0.elapsed(),
        stats.finished_requests_total,
        reasons.lock().unwrap(),
    );
    // The strategy reaches past validation often enough to exercise the scheduler.
    assert!(
        served.iter().all(|&n| n >= CASES as usize / 20),
        "{served:?}"
    );
}
