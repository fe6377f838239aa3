//! Compile errors, limits, forks, EOS handling and vocab padding over the real tokenizer.

mod common;

use std::time::{Duration, Instant};

use common::{EOS, VOCAB, allowed, decoder, tokenizer};
use infermux_core::GuidedDecoder;
use infermux_guided::{
    GuidedDecodingParams, GuidedError, GuidedMode, LimitsConfig, LlgBuildError, LlgDecoder,
    TokenConstraint, TokenMask,
};
use serde_json::json;

/// Compiles `params`, expecting `GuidedError::Invalid` for `mode` within `limit`.
fn expect_invalid(dec: &LlgDecoder, params: &GuidedDecodingParams, mode: GuidedMode) -> String {
    let start = Instant::now();
    let err = match dec.constraint(params) {
        Ok(_) => panic!("{params:?} compiled"),
        Err(e) => e,
    };
    let took = start.elapsed();
    assert!(took < Duration::from_secs(2), "took {took:?}");
    match err {
        GuidedError::Invalid { mode: m, reason } => {
            assert_eq!(m, mode, "{reason}");
            reason
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
}

fn ids(text: &str) -> Vec<u32> {
    tokenizer().encode(text, false).unwrap().get_ids().to_vec()
}

#[test]
fn invalid_constraints_are_rejected_quickly() {
    let dec = decoder();
    let schema = |v| GuidedDecodingParams::json_schema(v);
    expect_invalid(
        dec,
        &schema(json!({ "type": "strnig" })),
        GuidedMode::JsonSchema,
    );
    expect_invalid(
        dec,
        &schema(json!({ "type": "object", "properties": 5 })),
        GuidedMode::JsonSchema,
    );
    expect_invalid(dec, &schema(json!("{not json")), GuidedMode::JsonSchema);
    expect_invalid(dec, &schema(json!(42)), GuidedMode::JsonSchema);
    expect_invalid(
        dec,
        &schema(json!({ "$ref": "#/$defs/missing" })),
        GuidedMode::JsonSchema,
    );
    expect_invalid(dec, &GuidedDecodingParams::regex("[a-"), GuidedMode::Regex);
    expect_invalid(dec, &GuidedDecodingParams::regex("(ab"), GuidedMode::Regex);
    expect_invalid(
        dec,
        &GuidedDecodingParams::grammar("start: foo\n"),
        GuidedMode::Grammar,
    );
    expect_invalid(
        dec,
        &GuidedDecodingParams::grammar("start: \"a\" |\n%%%"),
        GuidedMode::Grammar,
    );
    expect_invalid(
        dec,
        &GuidedDecodingParams::grammar("  "),
        GuidedMode::Grammar,
    );
    expect_invalid(
        dec,
        &GuidedDecodingParams {
            whitespace_pattern: Some("[".into()),
            json_object: Some(true),
            ..Default::default()
        },
        GuidedMode::JsonObject,
    );
    expect_invalid(
        dec,
        &GuidedDecodingParams::choice(Vec::<String>::new()),
        GuidedMode::Choice,
    );
    // No mode at all is not a constraint of any mode.
    assert!(matches!(
        dec.constraint(&GuidedDecodingParams::default()),
        Err(GuidedError::Runtime(_))
    ));
}

#[test]
fn too_large_constraints_hit_the_limits() {
    let small = LlgDecoder::new(
        tokenizer().clone(),
        &[EOS],
        VOCAB,
        LimitsConfig {
            max_grammar_size: 500,
            max_input_bytes: 20_000,
            max_compile_time: Duration::from_millis(300),
            ..LimitsConfig::default()
        },
    )
    .unwrap();
    let options: Vec<String> = (0..1500).map(|i| format!("option-{i}")).collect();
    let reason = expect_invalid(
        &small,
        &GuidedDecodingParams::choice(options.clone()),
        GuidedMode::Choice,
    );
    assert!(reason.contains("size"), "{reason}");
    let many: Vec<String> = (0..3000).map(|i| format!("option-{i}")).collect();
    let reason = expect_invalid(
        &small,
        &GuidedDecodingParams::choice(many),
        GuidedMode::Choice,
    );
    assert!(reason.contains("limit"), "{reason}");
    // With the default limits the same 1500 options compile.
    decoder()
        .constraint(&GuidedDecodingParams::choice(options))
        .expect("default limits fit 1500 options");

    // A grammar whose rules nest 500 deep, each repeated: far past a small grammar size.
    let mut lark = String::from("start: r0\n");
    for i in 0..500 {
        lark.push_str(&format!(
            "r{i}: \"x{i}\" r{} | \"y\" r{} \"z\"\n",
            i + 1,
            i + 1
        ));
    }
    lark.push_str("r500: \"end\"\n");
    expect_invalid(
        &small,
        &GuidedDecodingParams::grammar(lark),
        GuidedMode::Grammar,
    );

    // Lexer fuel bounds pathological regexes, with the default limits.
    let start = Instant::now();
    let r = decoder().constraint(&GuidedDecodingParams::regex("(a|b)*a(a|b){2000}c{3000}"));
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    if let Err(e) = r {
        assert!(
            matches!(
                e,
                GuidedError::Invalid {
                    mode: GuidedMode::Regex,
                    ..
                }
            ),
            "{e:?}"
        );
    }
    // Nested counted repetition (a million x's) makes the lexer's first state very slow to
    // build: the compile-time watchdog cancels it.
    let reason = expect_invalid(
        &small,
        &GuidedDecodingParams::regex("((x{100}){100}){100}"),
        GuidedMode::Regex,
    );
    assert!(reason.contains("longer than"), "{reason}");
}

#[test]
fn fork_is_independent() {
    let dec = decoder();
    let params = GuidedDecodingParams::regex("cat[0-9]{2}|dog[a-z]{2}");
    let mut original = dec.constraint(&params).unwrap();
    let mut mask = TokenMask::none(VOCAB);
    original.compute_mask(&mut mask).unwrap();
    let mut fork = original.fork();

    for &t in &ids("cat") {
        original.commit(t).unwrap();
    }
    for &t in &ids("dog") {
        fork.commit(t).unwrap();
    }
    let (mut m1, mut m2) = (TokenMask::none(VOCAB), TokenMask::none(VOCAB));
    original.compute_mask(&mut m1).unwrap();
    fork.compute_mask(&mut m2).unwrap();
    let seven = ids("7")[0];
    let x = ids("x")[0];
    assert!(m1.allows(seven) && !m1.allows(x));
    assert!(m2.allows(x) && !m2.allows(seven));
    // A fork of a fork, then diverging again.
    let mut fork2 = fork.fork();
    fork.commit(x).unwrap();
    assert!(
        fork2.commit(seven).is_err(),
        "digits are not allowed after dog"
    );
    fork2.commit(ids("y")[0]).unwrap();
    assert!(!fork.is_finished() && !fork2.is_finished());
    // A rejected token leaves the constraint usable.
    fork2.compute_mask(&mut m2).unwrap();
    assert!(m2.allows(x));
}

#[test]
fn eos_only_after_completion() {
    let dec = decoder();
    let mut c = dec
        .constraint(&GuidedDecodingParams::choice(["yes", "yesterday"]))
        .unwrap();
    let mut mask = TokenMask::none(VOCAB);
    c.compute_mask(&mut mask).unwrap();
    assert!(!mask.allows(EOS), "EOS before anything was generated");
    assert!(c.commit(EOS).is_err());
    for &t in &ids("yes") {
        c.commit(t).unwrap();
    }
    // "yes" is complete but "yesterday" may follow: EOS and the continuation are allowed.
    assert!(!c.is_finished());
    c.compute_mask(&mut mask).unwrap();
    assert!(mask.allows(EOS));
    assert!(mask.count() > 1);
    for &t in &ids("terday") {
        c.commit(t).unwrap();
    }
    // Nothing can follow "yesterday": finished, only EOS.
    assert!(c.is_finished());
    c.compute_mask(&mut mask).unwrap();
    assert_eq!(allowed(&mask), vec![EOS]);
    c.commit(EOS).unwrap();
    assert!(c.commit(ids("x")[0]).is_err());
}

#[test]
fn commit_rejects_disallowed_and_out_of_range_tokens() {
    let dec = decoder();
    let mut c = dec
        .compile(&GuidedDecodingParams::regex("[0-9]+"), VOCAB)
        .unwrap();
    assert!(matches!(
        c.commit(ids("a")[0]),
        Err(GuidedError::Runtime(_))
    ));
    assert!(matches!(
        c.commit(VOCAB as u32 + 5),
        Err(GuidedError::Runtime(_))
    ));
    c.commit(ids("4")[0]).unwrap();
}

#[test]
fn ids_past_the_tokenizer_are_never_allowed() {
    let wide = VOCAB + 64;
    let dec = LlgDecoder::new(
        tokenizer().clone(),
        &[EOS, 0],
        wide,
        LimitsConfig::default(),
    )
    .unwrap();
    let mut c = dec
        .compile(&GuidedDecodingParams::regex(".{1,10}"), wide)
        .unwrap();
    let mut mask = TokenMask::none(wide);
    c.compute_mask(&mut mask).unwrap();
    let ids = allowed(&mask);
    assert!(ids.len() > 40_000, "{}", ids.len());
    assert!(ids.iter().all(|&id| (id as usize) < VOCAB));
    assert!(c.commit(VOCAB as u32 + 1).is_err());
    // Both EOS ids are allowed once "a" is complete (and "b" may still follow).
    let mut c = dec
        .constraint(&GuidedDecodingParams::regex("a|ab"))
        .unwrap();
    c.commit(common::tokenizer().token_to_id("a").unwrap())
        .unwrap();
    c.compute_mask(&mut mask).unwrap();
    let b = common::tokenizer().token_to_id("b").unwrap();
    assert_eq!(allowed(&mask), {
        let mut v = vec![0, EOS, b];
        v.sort();
        v
    });
    // A mask narrower than the trie gets the ids that fit.
    let mut narrow = TokenMask::none(100);
    let mut c = dec
        .constraint(&GuidedDecodingParams::regex("[!-~]"))
        .unwrap();
    c.compute_mask(&mut narrow).unwrap();
    assert!(allowed(&narrow).iter().all(|&id| id < 100));
}

#[test]
fn bad_decoder_inputs_are_errors() {
    let tok = tokenizer().clone();
    assert_eq!(
        LlgDecoder::new(tok.clone(), &[], VOCAB, LimitsConfig::default()).unwrap_err(),
        LlgBuildError::NoEos
    );
    assert!(matches!(
        LlgDecoder::new(
            tok.clone(),
            &[VOCAB as u32],
            VOCAB + 10,
            LimitsConfig::default()
        ),
        Err(LlgBuildError::EosOutOfRange { .. })
    ));
    assert!(matches!(
        LlgDecoder::new(tok, &[EOS], 1000, LimitsConfig::default()),
        Err(LlgBuildError::VocabTooSmall { .. })
    ));
    assert!(matches!(
        LlgDecoder::from_file(
            "/nonexistent/tokenizer.json",
            &[EOS],
            VOCAB,
            LimitsConfig::default()
        ),
        Err(LlgBuildError::Tokenizer(_))
    ));
}

#[test]
fn cached_grammars_give_fresh_constraints() {
    let dec = decoder();
    let params = GuidedDecodingParams::json_schema(json!({
        "type": "object",
        "properties": { "n": { "type": "integer" } },
        "required": ["n"]
    }));
    let mut first = dec.constraint(&params).unwrap();
    for &t in &ids("{\"n\": 1") {
        first.commit(t).unwrap();
    }
    let start = Instant::now();
    let mut second = dec.constraint(&params).unwrap();
    let cached = start.elapsed();
    let mut mask = TokenMask::none(VOCAB);
    second.compute_mask(&mut mask).unwrap();
    // The second constraint starts over: `{` is allowed, `}` is not.
    assert!(mask.allows(ids("{")[0]));
    assert!(!mask.allows(ids("}")[0]));
    assert!(cached < Duration::from_millis(50), "{cached:?}");
}

/// Every token the mask allows is accepted by commit, on choices whose options hold control
/// characters and 4-byte UTF-8 characters.
#[test]
fn every_allowed_token_commits_on_byte_level_choices() {
    let dec = decoder();
    for options in [
        vec!["%\u{0}\u{f464e}\u{fffd}=", "x4"],
        vec!["caf\u{e9} \u{1f600}", "x"],
    ] {
        let params = GuidedDecodingParams::choice(options.clone());
        // Depth-first over a few paths: at each step try the first few allowed tokens.
        let first: Box<dyn TokenConstraint> = Box::new(dec.constraint(&params).unwrap());
        let mut stack = vec![(first, Vec::<u32>::new())];
        let mut checked = 0;
        while let Some((mut c, path)) = stack.pop() {
            if path.len() > 12 || c.is_finished() {
                continue;
            }
            let mut mask = TokenMask::none(VOCAB);
            c.compute_mask(&mut mask).unwrap();
            for id in allowed(&mask).into_iter().take(6) {
                let mut next = c.fork();
                next.commit(id).unwrap_or_else(|e| {
                    panic!("{options:?}: after {path:?}, token {id} allowed by the mask but refused: {e}")
                });
                checked += 1;
                let mut longer = path.clone();
                longer.push(id);
                stack.push((next, longer));
            }
        }
        assert!(checked > 0);
    }
}

/// SmolLM2's vocabulary has no token for the byte 0xF1, so an option spelled with it cannot be
/// produced; llguidance's mask then still offers a token that commit refuses (found by the wire
/// fuzz). That is the request's grammar, not a server fault: a typed request error.
#[test]
fn a_choice_this_vocabulary_cannot_spell_is_a_request_error() {
    let params = GuidedDecodingParams::choice(["%D\u{5bbe5}.", "IHv"]);
    let mut c = decoder().constraint(&params).unwrap();
    let (percent, d) = (ids("%"), ids("D"));
    c.commit(percent[0]).unwrap();
    c.commit(d[0]).unwrap();
    let mut mask = TokenMask::none(VOCAB);
    c.compute_mask(&mut mask).unwrap();
    let offered = allowed(&mask);
    let refused = offered
        .iter()
        .find_map(|&id| c.fork().commit(id).err())
        .expect("a token of the mask is refused");
    match refused {
        GuidedError::Invalid { mode, reason } => {
            assert_eq!(mode, GuidedMode::Choice);
            assert!(reason.contains("vocabulary"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}
