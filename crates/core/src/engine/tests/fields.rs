//! One test per `SamplingParams` field (and beam search, streaming): each fails if the field
//! is ignored, by comparing against the same request without it.

use super::*;
use crate::engine::{BeamSearchRequest, StreamUpdate};
use crate::guided::{GuidedDecoder, GuidedDecodingParams, GuidedError, TokenConstraint, TokenMask};
use crate::params::{BeamSearchParams, OutputKind};
use crate::text::{TextCodec, TextError};

/// Ids 0..=25 are `a`..=`z`, 26 is a space, 27/28 are the two bytes of "é", 29 "!", 30 "?",
/// 31 (EOS) is the special `<eos>`.
pub(super) struct Letters;

impl TextCodec for Letters {
    fn encode(&self, text: &str) -> Result<Vec<TokenId>, TextError> {
        text.chars()
            .map(|c| match c {
                'a'..='z' => Ok(c as TokenId - 'a' as TokenId),
                ' ' => Ok(26),
                _ => Err(TextError(format!("no token for {c:?}"))),
            })
            .collect()
    }
    fn decode(&self, ids: &[TokenId]) -> Result<String, TextError> {
        let mut bytes = Vec::new();
        for &id in ids {
            match id {
                0..=25 => bytes.push(b'a' + id as u8),
                26 => bytes.push(b' '),
                27 => bytes.push(0xC3),
                28 => bytes.push(0xA9),
                29 => bytes.push(b'!'),
                30 => bytes.push(b'?'),
                _ => bytes.extend_from_slice(b"<eos>"),
            }
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
    fn is_special(&self, id: TokenId) -> bool {
        id == EOS
    }
}

/// Allows only even ids, and EOS once four tokens were committed.
pub(super) struct EvenOnly {
    pub(super) committed: usize,
}

impl TokenConstraint for EvenOnly {
    fn compute_mask(&mut self, mask: &mut TokenMask) -> Result<(), GuidedError> {
        if self.committed >= 4 {
            mask.allow(EOS);
            return Ok(());
        }
        (0..VOCAB as TokenId)
            .filter(|t| t % 2 == 0)
            .for_each(|t| mask.allow(t));
        Ok(())
    }
    fn commit(&mut self, token: TokenId) -> Result<(), GuidedError> {
        if token % 2 == 1 && token != EOS {
            return Err(GuidedError::Runtime(format!("{token} is odd")));
        }
        self.committed += 1;
        Ok(())
    }
    fn is_finished(&self) -> bool {
        self.committed > 4
    }
    fn fork(&self) -> Box<dyn TokenConstraint> {
        Box::new(EvenOnly {
            committed: self.committed,
        })
    }
}

pub(super) struct EvenDecoder;

impl GuidedDecoder for EvenDecoder {
    fn compile(
        &self,
        params: &GuidedDecodingParams,
        _vocab_size: usize,
    ) -> Result<Box<dyn TokenConstraint>, GuidedError> {
        match params.regex.as_deref() {
            Some("even") => Ok(Box::new(EvenOnly { committed: 0 })),
            _ => Err(GuidedError::Invalid {
                mode: params.mode().expect("validated"),
                reason: "only `even` compiles".into(),
            }),
        }
    }
}

fn text_engine() -> Engine {
    let (backend, _) = FakeBackend::new(64);
    let tools = EngineTools {
        codec: Some(Arc::new(Letters)),
        guided: Some(Arc::new(EvenDecoder)),
    };
    Engine::start_with(backend, EngineConfig::default(), tools).unwrap()
}

const PROMPT: [TokenId; 3] = [1, 2, 3];

fn run(e: &Engine, params: SamplingParams) -> GenerateOutput {
    e.generate(GenerateRequest::new(PROMPT.to_vec(), params))
        .wait()
        .unwrap()
}

/// `extra` plus a ban on the two lone UTF-8 bytes, so greedy text is one char per token.
fn bias<const N: usize>(
    extra: [(TokenId, f32); N],
) -> Option<std::collections::BTreeMap<TokenId, f32>> {
    let mut b: std::collections::BTreeMap<TokenId, f32> = [(27, -100.0), (28, -100.0)].into();
    b.extend(extra);
    Some(b)
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        ignore_eos: true,
        logit_bias: bias([]),
        ..SamplingParams::greedy(max_tokens)
    }
}

fn tokens(out: &GenerateOutput) -> &[TokenId] {
    &out.sequences[0].tokens
}

fn count(out: &GenerateOutput, t: TokenId) -> usize {
    tokens(out).iter().filter(|&&x| x == t).count()
}

/// Greedy output that repeats token 5 (biased well above every other logit).
fn repetitive() -> SamplingParams {
    SamplingParams {
        logit_bias: bias([(5, 5.0)]),
        ..greedy(16)
    }
}

#[test]
fn logit_bias_and_allowed_token_ids() {
    let e = text_engine();
    assert_eq!(count(&run(&e, repetitive()), 5), 16);
    let allowed = run(
        &e,
        SamplingParams {
            allowed_token_ids: Some(vec![7, 9]),
            temperature: 1.0,
            seed: Some(3),
            ..greedy(16)
        },
    );
    assert!(tokens(&allowed).iter().all(|t| [7, 9].contains(t)));
}

#[test]
fn each_penalty_breaks_the_repetition() {
    let e = text_engine();
    for (name, params) in [
        (
            "repetition_penalty",
            SamplingParams {
                repetition_penalty: 50.0,
                ..repetitive()
            },
        ),
        (
            "frequency_penalty",
            SamplingParams {
                frequency_penalty: 2.0,
                ..repetitive()
            },
        ),
        (
            "presence_penalty",
            SamplingParams {
                presence_penalty: 2.0,
                logit_bias: bias([(5, 1.5)]),
                ..repetitive()
            },
        ),
    ] {
        let n = count(&run(&e, params), 5);
        assert!(n < 16, "{name}: token 5 still generated {n} times");
    }
}

#[test]
fn bad_words_are_never_generated() {
    let e = text_engine();
    // "fg" is two tokens (5, 6): after 5, 6 is blocked; "f" alone (token 5) is blocked outright.
    let pair = SamplingParams {
        logit_bias: bias([(5, 5.0), (6, 10.0)]),
        ..greedy(8)
    };
    let base = run(&e, pair.clone());
    assert_eq!(&tokens(&base)[..2], &[6, 6]);
    let blocked = run(
        &e,
        SamplingParams {
            bad_words: vec!["fg".into()],
            ..pair
        },
    );
    assert!(!tokens(&blocked).windows(2).any(|w| w == [5, 6]));
    let single = run(
        &e,
        SamplingParams {
            bad_words: vec!["f".into()],
            ..repetitive()
        },
    );
    assert_eq!(count(&single, 5), 0);
}

#[test]
fn min_tokens_holds_back_eos_and_stop_tokens() {
    let e = text_engine();
    let eager = SamplingParams {
        logit_bias: bias([(EOS, 100.0)]),
        ..SamplingParams::greedy(16)
    };
    let out = run(&e, eager.clone());
    assert_eq!(
        (tokens(&out).len(), out.sequences[0].finish_reason),
        (1, FinishReason::Eos)
    );
    let out = run(
        &e,
        SamplingParams {
            min_tokens: 5,
            ..eager
        },
    );
    assert_eq!(tokens(&out).len(), 6);
    assert_eq!(out.sequences[0].finish_reason, FinishReason::Eos);
    let stop_tok = SamplingParams {
        logit_bias: bias([(4, 100.0)]),
        stop_token_ids: vec![4],
        min_tokens: 3,
        ..greedy(16)
    };
    let out = run(&e, stop_tok);
    assert_eq!(tokens(&out).len(), 4);
    assert_eq!(
        out.sequences[0].stop_reason,
        Some(crate::engine::StopReason::Token(4))
    );
}

#[test]
fn stop_strings_span_tokens_and_are_cut_from_the_text() {
    let e = text_engine();
    let base = run(&e, greedy(16));
    let text = base.sequences[0].text.clone().unwrap();
    assert_eq!(text.len(), 16, "one byte per token: {text:?}");
    // A two-token stop string from the middle of the greedy text.
    let stop = text[6..8].to_string();
    let first = text.find(&stop).unwrap();
    let out = run(
        &e,
        SamplingParams {
            stop: vec![stop.clone()],
            ..greedy(16)
        },
    );
    let s = &out.sequences[0];
    assert_eq!(s.finish_reason, FinishReason::StopString);
    assert_eq!(s.text.as_deref(), Some(&text[..first]));
    assert_eq!(
        s.stop_reason,
        Some(crate::engine::StopReason::String(stop.clone()))
    );
    let kept = run(
        &e,
        SamplingParams {
            stop: vec![stop.clone()],
            include_stop_str_in_output: true,
            ..greedy(16)
        },
    );
    assert_eq!(kept.sequences[0].text.as_deref(), Some(&text[..first + 2]));
    let pattern = run(
        &e,
        SamplingParams {
            stop_pattern: Some(regex::escape(&stop)),
            ..greedy(16)
        },
    );
    assert_eq!(pattern.sequences[0].text.as_deref(), Some(&text[..first]));
    assert_eq!(pattern.sequences[0].finish_reason, FinishReason::StopString);
}

#[test]
fn text_options() {
    let e = text_engine();
    let base = SamplingParams {
        logit_bias: bias([(EOS, 4.0)]),
        ..greedy(12)
    };
    let skip = run(&e, base.clone());
    let text = skip.sequences[0].text.clone().unwrap();
    assert!(count(&skip, EOS) > 0 && !text.contains("<eos>"), "{text}");
    let keep = run(
        &e,
        SamplingParams {
            skip_special_tokens: false,
            ..base.clone()
        },
    );
    let spaced = keep.sequences[0].text.clone().unwrap();
    assert!(spaced.contains("<eos>"), "{spaced}");
    let tight = run(
        &e,
        SamplingParams {
            skip_special_tokens: false,
            spaces_between_special_tokens: false,
            ..base.clone()
        },
    );
    let tight = tight.sequences[0].text.clone().unwrap();
    assert!(
        spaced.len() > tight.len() && !tight.contains(" <eos>"),
        "{tight}"
    );
    let none = run(
        &e,
        SamplingParams {
            detokenize: false,
            ..base
        },
    );
    assert_eq!(none.sequences[0].text, None);
}

#[test]
fn truncate_prompt_tokens_keeps_the_tail() {
    let e = text_engine();
    let long: Vec<TokenId> = (0..10).collect();
    let cut = e
        .generate(GenerateRequest::new(
            long,
            SamplingParams {
                truncate_prompt_tokens: Some(3),
                ..greedy(4)
            },
        ))
        .wait()
        .unwrap();
    let tail = e
        .generate(GenerateRequest::new(vec![7, 8, 9], greedy(4)))
        .wait()
        .unwrap();
    assert_eq!(cut.prompt_len, 3);
    assert_eq!(cut.sequences, tail.sequences);
}

#[test]
fn prompt_logprobs_and_logprobs_counts() {
    let e = text_engine();
    let out = run(
        &e,
        SamplingParams {
            prompt_logprobs: Some(2),
            logprobs: Some(3),
            ..greedy(4)
        },
    );
    let prompt = out.prompt_logprobs.unwrap();
    assert_eq!(prompt.len(), 3);
    assert!(prompt[0].is_none() && prompt[1].is_some());
    assert_eq!(
        out.topk_prompt_logprobs.unwrap()[2].as_ref().unwrap().len(),
        2
    );
    let top = out.sequences[0].top_logprobs.as_ref().unwrap();
    assert!(top.iter().all(|t| t.len() == 3));
    assert_eq!(top[0][0].0, out.sequences[0].tokens[0], "greedy = top-1");
}

#[test]
fn best_of_returns_the_most_likely_of_the_draws() {
    let e = text_engine();
    let draw = SamplingParams {
        n: 4,
        ..sampled(1.0, 11, 6)
    };
    let all = run(&e, draw.clone());
    let best = run(
        &e,
        SamplingParams {
            n: 1,
            best_of: Some(4),
            ..draw
        },
    );
    let top = all
        .sequences
        .iter()
        .max_by(|a, b| a.cumulative_logprob.total_cmp(&b.cumulative_logprob))
        .unwrap();
    assert_eq!(best.sequences.len(), 1);
    assert_eq!(best.sequences[0].tokens, top.tokens);
}

#[test]
fn guided_decoding_constrains_and_bad_constraints_are_request_errors() {
    let e = text_engine();
    let out = run(
        &e,
        SamplingParams {
            guided_decoding: Some(GuidedDecodingParams::regex("even")),
            n: 3,
            ignore_eos: false,
            ..sampled(1.0, 5, 16)
        },
    );
    for s in &out.sequences {
        assert!(s.tokens[..4].iter().all(|t| t % 2 == 0), "{:?}", s.tokens);
        assert_eq!(s.tokens.len(), 5, "EOS forced once the grammar completes");
        assert_eq!(s.finish_reason, FinishReason::Eos);
    }
    let err = e
        .generate(GenerateRequest::new(
            PROMPT.to_vec(),
            SamplingParams {
                guided_decoding: Some(GuidedDecodingParams::regex("odd")),
                ..greedy(4)
            },
        ))
        .wait()
        .unwrap_err();
    assert!(err.to_string().contains("guided_decoding"), "{err}");
    // allowed_token_ids [0] meets the grammar until it wants only EOS (after four tokens):
    // then the request fails naming the field, in either temperature, and the engine serves on.
    for temperature in [0.0, 1.5] {
        let err = e
            .generate(GenerateRequest::new(
                PROMPT.to_vec(),
                SamplingParams {
                    guided_decoding: Some(GuidedDecodingParams::regex("even")),
                    allowed_token_ids: Some(vec![0]),
                    ..sampled(temperature, 5, 16)
                },
            ))
            .wait()
            .unwrap_err();
        match err {
            EngineError::Invalid(ValidationError::InvalidField { field, reason }) => {
                assert_eq!(field, "allowed_token_ids");
                assert!(reason.contains("output position 4"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(run(&e, greedy(3)).sequences[0].tokens.len(), 3);
}

fn stream(e: &Engine, kind: OutputKind) -> Vec<StreamUpdate> {
    let params = SamplingParams {
        output_kind: kind,
        stop: vec!["zz".into()],
        ..greedy(12)
    };
    e.generate_stream(GenerateRequest::new(PROMPT.to_vec(), params))
        .map(Result::unwrap)
        .collect()
}

#[test]
fn output_kinds_stream_delta_cumulative_and_final() {
    let e = text_engine();
    let final_text = run(&e, greedy(12)).sequences[0].text.clone().unwrap();
    let delta = stream(&e, OutputKind::Delta);
    assert!(delta.len() > 2 && delta.last().unwrap().finished);
    let joined: String = delta
        .iter()
        .flat_map(|u| u.sequences.iter().map(|s| s.text.as_str()))
        .collect();
    assert_eq!(joined, final_text);
    let toks: usize = delta
        .iter()
        .flat_map(|u| &u.sequences)
        .map(|s| s.tokens.len())
        .sum();
    assert_eq!(toks, 12);
    let cumulative = stream(&e, OutputKind::Cumulative);
    for w in cumulative.windows(2) {
        assert!(w[1].sequences[0].text.starts_with(&w[0].sequences[0].text));
    }
    assert_eq!(cumulative.last().unwrap().sequences[0].text, final_text);
    let last = stream(&e, OutputKind::FinalOnly);
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].sequences[0].text, final_text);
}

#[test]
fn streamed_text_holds_back_a_possible_stop_and_never_splits_a_character() {
    let e = text_engine();
    // Bias the two bytes of "é" so they alternate with letters; "é" must arrive whole.
    let params = SamplingParams {
        output_kind: OutputKind::Delta,
        logit_bias: Some([(27, 3.0), (28, 3.0)].into()),
        ..sampled(1.0, 2, 24)
    };
    let updates: Vec<StreamUpdate> = e
        .generate_stream(GenerateRequest::new(PROMPT.to_vec(), params.clone()))
        .map(Result::unwrap)
        .collect();
    let whole = run(&e, SamplingParams { ..params }).sequences[0]
        .text
        .clone()
        .unwrap();
    let mut joined = String::new();
    for u in &updates {
        for s in &u.sequences {
            let lone_byte = s.text.contains('\u{FFFD}') && !whole.contains('\u{FFFD}');
            assert!(!lone_byte, "a delta split a character: {:?}", s.text);
            joined.push_str(&s.text);
        }
    }
    assert_eq!(joined, whole);
    // A stop string's prefix is held back until it cannot become the stop string.
    let base = run(&e, greedy(12)).sequences[0].text.clone().unwrap();
    let stop = format!("{}#", &base[4..6]);
    let held: Vec<StreamUpdate> = e
        .generate_stream(GenerateRequest::new(
            PROMPT.to_vec(),
            SamplingParams {
                output_kind: OutputKind::Cumulative,
                stop: vec![stop],
                ..greedy(12)
            },
        ))
        .map(Result::unwrap)
        .collect();
    let shown_at_5 = held
        .iter()
        .find(|u| u.sequences[0].tokens.len() == 6)
        .map(|u| u.sequences[0].text.clone())
        .unwrap();
    assert_eq!(
        shown_at_5,
        base[..4],
        "the possible stop prefix is held back"
    );
    assert_eq!(held.last().unwrap().sequences[0].text, base);
}

#[test]
fn dropping_a_stream_frees_its_slots() {
    let e = text_engine();
    let mut s = e.generate_stream(GenerateRequest::new(
        PROMPT.to_vec(),
        SamplingParams {
            output_kind: OutputKind::Delta,
            n: 2,
            ..greedy(60)
        },
    ));
    assert!(s.next_blocking().unwrap().is_ok());
    drop(s);
    let total = e.config().max_num_seqs;
    for _ in 0..200 {
        let stats = e.stats().unwrap();
        if stats.free_slots == total {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    panic!("slots not freed: {:?}", e.stats().unwrap());
}

/// A reference beam search straight over `fake_logits` (no engine, no KV).
fn naive_beams(prompt: &[TokenId], width: usize, steps: usize) -> Vec<Vec<TokenId>> {
    let mut beams: Vec<(Vec<TokenId>, f64)> = vec![(Vec::new(), 0.0)];
    for _ in 0..steps {
        let mut cands = Vec::new();
        for (toks, score) in &beams {
            let hist: Vec<TokenId> = prompt.iter().chain(toks).copied().collect();
            let row = fake_logits(&hist);
            let lse = crate::sampling::logsumexp(&row);
            for (t, &x) in row.iter().enumerate() {
                let mut next = toks.clone();
                next.push(t as TokenId);
                cands.push((next, score + (x - lse) as f64));
            }
        }
        cands.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.last().cmp(&b.0.last())));
        cands.truncate(width);
        beams = cands;
    }
    beams.into_iter().map(|b| b.0).collect()
}

#[test]
fn beam_search_matches_a_reference_and_width_one_is_greedy() {
    let e = text_engine();
    let beams = |width| {
        let params = BeamSearchParams {
            ignore_eos: true,
            ..BeamSearchParams::new(width, 5)
        };
        e.beam_search(BeamSearchRequest {
            prompt: PROMPT.to_vec().into(),
            params,
        })
        .wait()
        .unwrap()
    };
    let one = beams(1);
    let plain = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(5)
    };
    assert_eq!(one.sequences[0].tokens, tokens(&run(&e, plain)));
    let three = beams(3);
    let got: Vec<Vec<TokenId>> = three.sequences.iter().map(|s| s.tokens.clone()).collect();
    assert_eq!(got, naive_beams(&PROMPT, 3, 5));
    let scores: Vec<f64> = three
        .sequences
        .iter()
        .map(|s| s.cumulative_logprob)
        .collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    assert!(three.sequences[0].text.is_some());
    assert_eq!(e.stats().unwrap().free_slots, e.config().max_num_seqs);
}
