use super::*;
use crate::error::ValidationError;

fn field_of(err: ValidationError) -> &'static str {
    match err {
        ValidationError::InvalidField { field, .. } => field,
        other => panic!("expected InvalidField, got {other:?}"),
    }
}

fn bad(f: fn(&mut SamplingParams)) -> &'static str {
    let mut p = SamplingParams::default();
    f(&mut p);
    field_of(p.validate().unwrap_err())
}

#[test]
fn defaults_are_valid_and_match_easydel() {
    let p = SamplingParams::default();
    p.validate().unwrap();
    assert_eq!(
        (p.n, p.temperature, p.top_p, p.top_k, p.max_tokens),
        (1, 1.0, 1.0, 0, Some(16))
    );
    assert_eq!((p.repetition_penalty, p.min_tokens), (1.0, 0));
    assert!(p.detokenize && p.skip_special_tokens && p.spaces_between_special_tokens);
    assert_eq!(p.output_kind, OutputKind::Cumulative);
}

#[test]
fn each_bad_field_is_named() {
    assert_eq!(bad(|p| p.n = 0), "n");
    assert_eq!(
        bad(|p| {
            p.n = 3;
            p.best_of = Some(2)
        }),
        "best_of"
    );
    assert_eq!(
        bad(|p| {
            p.temperature = 0.0;
            p.best_of = Some(2)
        }),
        "best_of"
    );
    assert_eq!(bad(|p| p.presence_penalty = 2.5), "presence_penalty");
    assert_eq!(bad(|p| p.frequency_penalty = -3.0), "frequency_penalty");
    assert_eq!(bad(|p| p.repetition_penalty = 0.0), "repetition_penalty");
    assert_eq!(bad(|p| p.temperature = -0.1), "temperature");
    assert_eq!(bad(|p| p.temperature = f32::NAN), "temperature");
    assert_eq!(bad(|p| p.top_p = 0.0), "top_p");
    assert_eq!(bad(|p| p.top_p = 1.01), "top_p");
    assert_eq!(bad(|p| p.min_p = -0.5), "min_p");
    assert_eq!(bad(|p| p.stop = vec![String::new()]), "stop");
    assert_eq!(bad(|p| p.stop_pattern = Some("(".into())), "stop_pattern");
    assert_eq!(bad(|p| p.bad_words = vec![" ".into()]), "bad_words");
    assert_eq!(bad(|p| p.stop = vec!["x".into(); 1025]), "stop");
    assert_eq!(bad(|p| p.stop = vec!["x".repeat(4097)]), "stop");
    assert_eq!(bad(|p| p.bad_words = vec!["x".into(); 1025]), "bad_words");
    assert_eq!(bad(|p| p.bad_words = vec!["x".repeat(4097)]), "bad_words");
    for ok in [vec!["x".into(); 1024], vec!["x".repeat(4096)]] {
        let p = SamplingParams {
            stop: ok.clone(),
            bad_words: ok,
            ..SamplingParams::default()
        };
        p.validate().unwrap();
    }
    assert_eq!(bad(|p| p.max_tokens = Some(0)), "max_tokens");
    assert_eq!(bad(|p| p.min_tokens = 17), "min_tokens");
    assert_eq!(bad(|p| p.logprobs = Some(MAX_TOP_LOGPROBS + 1)), "logprobs");
    assert_eq!(
        bad(|p| p.prompt_logprobs = Some(MAX_TOP_LOGPROBS + 1)),
        "prompt_logprobs"
    );
    assert_eq!(
        bad(|p| p.truncate_prompt_tokens = Some(0)),
        "truncate_prompt_tokens"
    );
    assert_eq!(
        bad(|p| p.guided_decoding = Some(Default::default())),
        "guided_decoding"
    );
    assert_eq!(
        bad(|p| p.logit_bias = Some([(3, 101.0)].into())),
        "logit_bias"
    );
    assert_eq!(
        bad(|p| p.allowed_token_ids = Some(vec![])),
        "allowed_token_ids"
    );
}

#[test]
fn token_fields_are_checked_against_vocab() {
    let check = |f: fn(&mut SamplingParams)| {
        let mut p = SamplingParams::default();
        f(&mut p);
        p.validate_for_vocab(11).map_err(field_of)
    };
    assert_eq!(check(|p| p.stop_token_ids = vec![3, 10]), Ok(()));
    assert_eq!(
        check(|p| p.stop_token_ids = vec![11]),
        Err("stop_token_ids")
    );
    assert_eq!(
        check(|p| p.logit_bias = Some([(12, 1.0)].into())),
        Err("logit_bias")
    );
    assert_eq!(
        check(|p| p.allowed_token_ids = Some(vec![1, 40])),
        Err("allowed_token_ids")
    );
}

#[test]
fn json_round_trip_and_unknown_fields() {
    let p = SamplingParams {
        temperature: 0.7,
        seed: Some(7),
        top_k: 40,
        stop: vec!["\n\n".into()],
        logit_bias: Some([(5, -3.5)].into()),
        output_kind: OutputKind::Delta,
        guided_decoding: Some(crate::guided::GuidedDecodingParams::regex("[a-z]+")),
        extra_args: [("tag".to_string(), serde_json::json!({"k": [1, 2]}))].into(),
        ..SamplingParams::default()
    };
    let json = p.to_json();
    assert!(json.contains(r#""output_kind":"DELTA""#), "{json}");
    assert_eq!(SamplingParams::from_json(&json).unwrap(), p);
    let partial =
        SamplingParams::from_json(r#"{"max_tokens": 3, "logit_bias": {"7": 2.0}}"#).unwrap();
    assert_eq!(partial.max_tokens, Some(3));
    assert_eq!(partial.logit_bias, Some([(7, 2.0)].into()));
    assert!(SamplingParams::from_json(r#"{"temprature": 1}"#).is_err());
}

#[test]
fn generation_config_fills_only_defaulted_fields() {
    let cfg: GenerationConfig = serde_json::from_str(
        r#"{"temperature": 0.6, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.1,
            "max_new_tokens": 64, "eos_token_id": [2, 7]}"#,
    )
    .unwrap();
    let mut p = SamplingParams {
        top_p: 0.5,
        ..SamplingParams::default()
    };
    p.update_with_generation_config(&cfg);
    assert_eq!(
        (p.temperature, p.top_p, p.top_k, p.repetition_penalty),
        (0.6, 0.5, 50, 1.1)
    );
    assert_eq!(p.max_tokens, Some(64));
    assert_eq!(p.stop_token_ids, vec![2, 7]);
    let greedy: GenerationConfig = serde_json::from_str(r#"{"do_sample": false}"#).unwrap();
    let mut q = SamplingParams::default();
    q.update_with_generation_config(&greedy);
    assert_eq!(q.temperature, 0.0);
}

#[test]
fn beam_params_validate() {
    BeamSearchParams::new(4, 8).validate().unwrap();
    assert_eq!(
        field_of(BeamSearchParams::new(0, 8).validate().unwrap_err()),
        "beam_width"
    );
    let back: BeamSearchParams =
        serde_json::from_str(r#"{"beam_width": 2, "max_tokens": 5}"#).unwrap();
    assert_eq!(back, BeamSearchParams::new(2, 5));
}
