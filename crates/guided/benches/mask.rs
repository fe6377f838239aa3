//! Per-token cost of guided decoding: `compute_mask` + `commit` for a JSON schema over the
//! real SmolLM2 tokenizer (49152 ids), along a fixed valid output.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use infermux_core::{GuidedDecodingParams, TokenConstraint, TokenMask};
use infermux_guided::{LimitsConfig, LlgDecoder};
use serde_json::json;

const EOS: u32 = 2;
const VOCAB: usize = 49152;

fn schema() -> serde_json::Value {
    json!({
        "type": "object",
        "properties": {
            "name": { "type": "string", "maxLength": 40 },
            "age": { "type": "integer", "minimum": 0, "maximum": 150 },
            "role": { "enum": ["admin", "user", "guest"] },
            "tags": { "type": "array", "items": { "type": "string" }, "maxItems": 8 },
            "address": {
                "type": "object",
                "properties": {
                    "city": { "type": "string" },
                    "zip": { "type": "string", "pattern": "^[0-9]{5}$" }
                },
                "required": ["city", "zip"]
            }
        },
        "required": ["name", "age", "role", "tags", "address"]
    })
}

const OUTPUT: &str = r#"{"name": "Ada Lovelace", "age": 36, "role": "admin", "tags": ["math", "poetry", "engines"], "address": {"city": "London", "zip": "12345"}}"#;

/// The tokens of one valid output, as the model's tokenizer splits it.
fn output_tokens(decoder: &LlgDecoder, tokenizer: &tokenizers::Tokenizer) -> Vec<u32> {
    let ids = tokenizer
        .encode(OUTPUT, false)
        .expect("encode")
        .get_ids()
        .to_vec();
    // Sanity: the whole path is allowed.
    let params = GuidedDecodingParams::json_schema(schema());
    let mut c = decoder.constraint(&params).expect("compiles");
    let mut mask = TokenMask::none(VOCAB);
    for &id in &ids {
        c.compute_mask(&mut mask).expect("mask");
        assert!(mask.allows(id), "token {id} not allowed");
        c.commit(id).expect("commit");
    }
    ids
}

fn bench(c: &mut Criterion) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/SmolLM2-135M-Instruct/tokenizer.json");
    let tokenizer = tokenizers::Tokenizer::from_file(&path).expect("tokenizer");
    let start = Instant::now();
    let decoder = LlgDecoder::new(tokenizer.clone(), &[EOS], VOCAB, LimitsConfig::default())
        .expect("decoder");
    eprintln!(
        "decoder build (token trie + parser factory): {:?}",
        start.elapsed()
    );
    let ids = output_tokens(&decoder, &tokenizer);
    let params = GuidedDecodingParams::json_schema(schema());

    let mut group = c.benchmark_group("guided");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(5));
    // Per token: the mean of compute_mask + commit over the output's tokens, from a fresh
    // constraint each pass (the compiled grammar is cached by the decoder).
    group.bench_function("json_schema_mask_commit_per_token", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut mask = TokenMask::none(VOCAB);
            for _ in 0..iters {
                let mut con = decoder.constraint(&params).expect("compiles");
                let t = Instant::now();
                for &id in &ids {
                    con.compute_mask(&mut mask).expect("mask");
                    con.commit(black_box(id)).expect("commit");
                }
                total += t.elapsed() / ids.len() as u32;
            }
            total
        })
    });
    // Compiling the schema without the cache (a new request with a new schema).
    let uncached = LlgDecoder::new(
        tokenizer,
        &[EOS],
        VOCAB,
        LimitsConfig {
            grammar_cache_entries: 0,
            ..LimitsConfig::default()
        },
    )
    .expect("decoder");
    group.bench_function("json_schema_compile", |b| {
        b.iter(|| black_box(uncached.constraint(&params).expect("compiles")))
    });
    // Per token with a cold lexer: a freshly compiled grammar each pass (compile not timed).
    group.bench_function("json_schema_mask_commit_per_token_cold", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut mask = TokenMask::none(VOCAB);
            for _ in 0..iters {
                let mut con = uncached.constraint(&params).expect("compiles");
                let t = Instant::now();
                for &id in &ids {
                    con.compute_mask(&mut mask).expect("mask");
                    con.commit(black_box(id)).expect("commit");
                }
                total += t.elapsed() / ids.len() as u32;
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
