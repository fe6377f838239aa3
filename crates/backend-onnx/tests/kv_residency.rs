//! The KV cache kept in `present.*` blocks across runs: batched decode of sequences of different
//! lengths (left padding + mask), the resident fast path, composition changes, forks inside a
//! resident group, compaction and release all give the logits each sequence gets alone.
//!
//! Runs the real model (`INFERMUX_MODEL_DIR`, default `<repo>/models/SmolLM2-135M-Instruct` with
//! its exported `onnx/` graph); skipped when it is not there.

use std::path::PathBuf;

use infermux_backend_onnx::{OnnxBackend, OnnxOptions};
use infermux_core::{Backend, LogitsWanted, SlotId};

const TOLERANCE: f32 = 1e-3;

/// The reference model with its ONNX export (`cargo xtask setup` makes both); missing is a failure.
fn model_dir() -> PathBuf {
    let dir = std::env::var_os("INFERMUX_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct")
        });
    assert!(
        dir.join("onnx/model.onnx").is_file(),
        "no exported model in {}: run `cargo xtask setup`",
        dir.display()
    );
    dir
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Decodes `steps` as one batch and returns each slot's row.
fn decode(backend: &mut OnnxBackend, steps: &[(SlotId, u32)]) -> Vec<Vec<f32>> {
    decode_resident(backend, steps).0
}

/// Decodes `steps` as one batch: each slot's row, and whether the run reused the previous
/// run's output as its past.
fn decode_resident(backend: &mut OnnxBackend, steps: &[(SlotId, u32)]) -> (Vec<Vec<f32>>, bool) {
    let before = backend.kv_stats();
    let logits = backend.decode(steps).expect("decode");
    let after = backend.kv_stats();
    assert_eq!(
        after.resident_runs + after.assembled_runs,
        before.resident_runs + before.assembled_runs + 1
    );
    let rows = (0..steps.len())
        .map(|i| logits.last_row(i).expect("row").to_vec())
        .collect();
    (rows, after.resident_runs > before.resident_runs)
}

/// Decodes `slot` alone.
fn solo(backend: &mut OnnxBackend, slot: SlotId, token: u32) -> Vec<f32> {
    decode(backend, &[(slot, token)]).remove(0)
}

#[test]
fn batched_decode_matches_each_sequence_alone() {
    let dir = model_dir();
    let options = OnnxOptions {
        intra_threads: Some(2),
        ..OnnxOptions::default()
    };
    let mut backend = OnnxBackend::load(dir, options).expect("load");
    let prompts: [&[u32]; 3] = [
        &[1, 540, 2210, 314, 9],
        &[1, 4563, 28, 601, 18, 2034, 77, 8841, 12],
        &[1, 30, 715],
    ];
    // Live slots 0..3, their solo twins 10..13 (forks of the prefilled prompts).
    let (a, b, c) = (SlotId(0), SlotId(1), SlotId(2));
    let twin = |s: SlotId| SlotId(s.0 + 10);
    for (i, p) in prompts.iter().enumerate() {
        let slot = SlotId(i as u32);
        backend
            .prefill(slot, 0, p, LogitsWanted::Last)
            .expect("prefill");
        backend.fork(slot, twin(slot)).expect("fork");
        assert_eq!(backend.cached_len(twin(slot)), p.len());
    }
    let check = |got: &[f32], want: &[f32], what: &str| {
        let d = max_diff(got, want);
        assert!(d <= TOLERANCE, "{what}: max |Δ| {d}");
    };

    // Same composition for several steps: the first assembles a padded past, the rest reuse
    // the previous run's present tensors.
    for step in 0..4u32 {
        let tokens = [100 + step, 200 + step, 300 + step];
        let batch = decode(
            &mut backend,
            &[(a, tokens[0]), (b, tokens[1]), (c, tokens[2])],
        );
        for (i, &s) in [a, b, c].iter().enumerate() {
            let want = solo(&mut backend, twin(s), tokens[i]);
            check(&batch[i], &want, &format!("step {step}, slot {}", s.0));
        }
    }
    for (i, p) in prompts.iter().enumerate() {
        assert_eq!(backend.cached_len(SlotId(i as u32)), p.len() + 4);
    }

    // A fork inside a resident group shares its row; the group stays resident.
    let d = SlotId(3);
    backend.fork(b, d).expect("fork");
    let (batch, resident) = decode_resident(&mut backend, &[(a, 7), (b, 8), (c, 9)]);
    assert!(resident, "a fork does not change the group");
    let forked = solo(&mut backend, d, 8);
    check(&forked, &batch[1], "fork of a resident row");
    check(&batch[0], &solo(&mut backend, twin(a), 7), "after fork, a");
    check(&batch[2], &solo(&mut backend, twin(c), 9), "after fork, c");
    let _ = solo(&mut backend, twin(b), 8);

    // Composition changes: one leaves (assembled), then the order flips (still resident).
    let (batch, resident) = decode_resident(&mut backend, &[(a, 11), (c, 13)]);
    assert!(!resident);
    check(&batch[0], &solo(&mut backend, twin(a), 11), "a without b");
    check(&batch[1], &solo(&mut backend, twin(c), 13), "c without b");
    let (batch, resident) = decode_resident(&mut backend, &[(c, 23), (a, 21)]);
    assert!(resident, "a reordered group runs in its previous order");
    check(&batch[0], &solo(&mut backend, twin(c), 23), "c before a");
    check(&batch[1], &solo(&mut backend, twin(a), 21), "a after c");

    // `b` sat out two runs; it rejoins with a chunk of several tokens, then decodes.
    let chunk = [31, 32, 33];
    let start = backend.cached_len(b);
    let got = backend
        .prefill(b, start, &chunk, LogitsWanted::All)
        .expect("chunk");
    let want = backend
        .prefill(twin(b), start, &chunk, LogitsWanted::All)
        .expect("chunk");
    for (g, w) in got.chunk(0).zip(want.chunk(0)) {
        check(g, w, "chunk after sitting out");
    }
    let batch = decode(&mut backend, &[(a, 41), (b, 42), (c, 43), (d, 44)]);
    for (i, (s, t)) in [(a, 41), (b, 42), (c, 43)].into_iter().enumerate() {
        check(&batch[i], &solo(&mut backend, twin(s), t), "regrouped");
    }
    assert_eq!(backend.cached_len(d), backend.cached_len(twin(b)) - 3);

    // Release frees one slot only.
    backend.release(b);
    assert_eq!(backend.cached_len(b), 0);
    let batch = decode(&mut backend, &[(a, 51), (c, 53)]);
    check(
        &batch[0],
        &solo(&mut backend, twin(a), 51),
        "after release, a",
    );
    check(
        &batch[1],
        &solo(&mut backend, twin(c), 53),
        "after release, c",
    );
}
