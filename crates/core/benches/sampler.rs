//! One sampler step over a (batch 32 × vocab 49152) logits block, per parameter mix.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use infermux_core::SamplingParams;
use infermux_core::sampling::batch::BatchRow;
use infermux_core::sampling::{History, Knobs, Processors, SamplingBatch, SeqRng, SlotSampling};

const BATCH: usize = 32;
const VOCAB: usize = 49152;

/// Logits shaped like a language model's: a few strong tokens over a long tail.
fn logits() -> Vec<f32> {
    let mut rng = SeqRng::new(1, 0);
    (0..BATCH * VOCAB)
        .map(|i| {
            let u = rng.next_f64() as f32;
            let spike = if i % 997 == 0 { 8.0 } else { 0.0 };
            u * 4.0 - 6.0 + spike
        })
        .collect()
}

fn batch_of(params: &SamplingParams) -> SamplingBatch {
    let prompt: Vec<u32> = (0..256).map(|i| (i * 37) % VOCAB as u32).collect();
    let mut batch = SamplingBatch::new(BATCH);
    for slot in 0..BATCH {
        batch.insert(
            slot,
            SlotSampling {
                knobs: Knobs::of(params),
                processors: Arc::new(Processors::new(params, vec![], &[2], VOCAB)),
                history: History::new(&prompt),
                rng: SeqRng::new(7, slot as u64),
            },
        );
    }
    batch
}

fn sampler(c: &mut Criterion) {
    let data = logits();
    let rows: Vec<BatchRow<'_>> = data
        .chunks(VOCAB)
        .enumerate()
        .map(|(slot, logits)| BatchRow {
            slot,
            logits,
            mask: None,
        })
        .collect();
    let mixes = [
        ("greedy", SamplingParams::greedy(16)),
        ("temperature_1", SamplingParams::default()),
        (
            "top_k50_top_p0.95_t0.8",
            SamplingParams {
                temperature: 0.8,
                top_k: 50,
                top_p: 0.95,
                ..SamplingParams::default()
            },
        ),
        (
            "top_p0.9",
            SamplingParams {
                top_p: 0.9,
                ..SamplingParams::default()
            },
        ),
        (
            "penalties_min_p",
            SamplingParams {
                repetition_penalty: 1.1,
                frequency_penalty: 0.5,
                presence_penalty: 0.5,
                min_p: 0.05,
                ..SamplingParams::default()
            },
        ),
    ];
    let mut group = c.benchmark_group("sampler_step_32x49152");
    for (name, params) in mixes {
        let mut batch = batch_of(&params);
        group.bench_function(name, |b| b.iter(|| black_box(batch.sample(&rows))));
    }
    group.finish();
}

criterion_group!(benches, sampler);
criterion_main!(benches);
