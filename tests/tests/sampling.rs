//! The sampling contract on the real model (candle, CPU): beam search against Hugging Face's,
//! stop strings across token boundaries, streamed text against the final text.

use std::sync::OnceLock;

use infermux::{
    BeamSearchParams, ModelInput, OutputKind, SamplingClient, SamplingParams, ServiceClient,
};
use infermux_core::{FinishReason, StopReason};
use infermux_tests::{model_dir, repo_root};
use serde::Deserialize;

fn client() -> &'static SamplingClient {
    static CLIENT: OnceLock<SamplingClient> = OnceLock::new();
    CLIENT.get_or_init(|| {
        ServiceClient::new()
            .create_sampling_client(model_dir())
            .expect("the reference model loads on candle")
    })
}

fn prompt(text: &str) -> ModelInput {
    ModelInput::from_ints(client().get_tokenizer().encode(text, false).unwrap())
}

#[derive(Deserialize)]
struct BeamCase {
    name: String,
    prompt_tokens: Vec<u32>,
    beam_width: usize,
    max_new_tokens: usize,
    sequences: Vec<Vec<u32>>,
}

#[derive(Deserialize)]
struct BeamGoldens {
    cases: Vec<BeamCase>,
}

#[test]
fn beam_search_agrees_with_transformers() {
    let path = repo_root().join("tests/data/goldens/smollm2-135m-instruct-beams.json");
    let goldens: BeamGoldens =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for case in goldens.cases {
        let params = BeamSearchParams::new(case.beam_width, case.max_new_tokens);
        let out = client()
            .beam_search(ModelInput::from_ints(case.prompt_tokens.clone()), params)
            .wait()
            .unwrap();
        let got: Vec<Vec<u32>> = out.sequences.iter().map(|s| s.tokens.clone()).collect();
        assert_eq!(got, case.sequences, "case {}", case.name);
    }
}

#[test]
fn stop_strings_across_token_boundaries_are_cut() {
    let base = client()
        .sample(
            prompt("The capital of France is"),
            1,
            SamplingParams::greedy(24),
            false,
            0,
        )
        .wait()
        .unwrap();
    let s = &base.sequences[0];
    let text = s.text.clone().unwrap();
    let tokenizer = client().get_tokenizer();
    // Find a stop string that ends inside a token boundary: the last 2 chars of the first
    // token's text plus the first 2 chars of the next one.
    let piece = |i: usize| tokenizer.decode(&s.tokens[..=i], true).unwrap();
    let (i, cut) = (1..s.tokens.len())
        .map(|i| (i, piece(i - 1).len()))
        .find(|&(i, cut)| cut >= 2 && piece(i).len() >= cut + 2 && text.is_char_boundary(cut - 2))
        .expect("a boundary with two chars on both sides");
    let stop = text[cut - 2..cut + 2].to_string();
    let first = text.find(&stop).unwrap();
    assert!(
        first <= cut - 2,
        "stop {stop:?} first found after token {i}"
    );
    let stopped = client()
        .sample(
            prompt("The capital of France is"),
            1,
            SamplingParams {
                stop: vec![stop.clone()],
                ..SamplingParams::greedy(24)
            },
            false,
            0,
        )
        .wait()
        .unwrap();
    let st = &stopped.sequences[0];
    assert_eq!(st.finish_reason, FinishReason::StopString);
    assert_eq!(st.stopped_by, Some(StopReason::String(stop.clone())));
    let out_text = st.text.clone().unwrap();
    assert_eq!(out_text, text[..first]);
    assert!(!out_text.contains(&stop));
}

#[test]
fn streamed_deltas_add_up_to_the_final_text() {
    let text = "Écris une phrase en français avec des accents: été, où, naïve. 東京";
    let params = SamplingParams {
        temperature: 0.9,
        seed: Some(5),
        max_tokens: Some(40),
        ..SamplingParams::default()
    };
    let final_out = client()
        .sample(prompt(text), 1, params.clone(), false, 0)
        .wait()
        .unwrap();
    let stream = client().sample_stream(
        prompt(text),
        SamplingParams {
            output_kind: OutputKind::Delta,
            ..params
        },
    );
    let mut joined = String::new();
    let mut tokens = Vec::new();
    for update in stream {
        for s in update.unwrap().sequences {
            assert!(
                !s.text.contains('\u{FFFD}'),
                "split character in {:?}",
                s.text
            );
            joined.push_str(&s.text);
            tokens.extend(s.tokens);
        }
    }
    let s = &final_out.sequences[0];
    assert_eq!(tokens, s.tokens);
    assert_eq!(Some(joined), s.text);
    let full = client().get_tokenizer().decode(&s.tokens, true).unwrap();
    assert_eq!(s.text.as_deref(), Some(full.as_str()));
}
