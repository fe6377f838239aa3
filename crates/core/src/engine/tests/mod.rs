//! Scheduler tests against a fake backend whose logits depend only on a sequence's own history,
//! so batching must not change any result.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::*;
use crate::backend::{DType, Device, ForwardBatch, Logits, SlotId};
use crate::error::BackendError;
use crate::input::{ImageChunk, ImageFormat, ModelInputChunk};
use crate::kv::{KvStorage, KvTable, KvUsage};

const VOCAB: usize = 32;
const EOS: TokenId = 31;
/// A prompt token that makes the fake backend fail, to test failure isolation.
const POISON: TokenId = 30;
/// After this token the fake model all but certainly emits EOS.
const BYE: TokenId = 29;

#[derive(Default)]
struct Counters {
    tokens: AtomicUsize,
    forks: AtomicUsize,
    /// KV positions whose storage is alive now (a growth copy's old and new storage both).
    live_positions: AtomicUsize,
    /// The most `live_positions` has been.
    peak_positions: AtomicUsize,
    /// The most slots that held KV state at once.
    peak_slots: AtomicUsize,
    /// The first prompt token of each sequence prefilled from position 0, in order.
    prefill_order: Mutex<Vec<TokenId>>,
    /// `(first prompt token, step)` of each prefill from position 0: the step is the number
    /// of forward passes before it.
    prefill_steps: Mutex<Vec<(TokenId, usize)>>,
    /// Forward passes started so far.
    steps: AtomicUsize,
    /// When set, the next `release` clears it and panics (a backend bug outside `forward`).
    panic_on_release: std::sync::atomic::AtomicBool,
    /// When set, `kv_usage` panics (kills the engine thread: used to test `Shutdown`).
    panic_on_kv_usage: std::sync::atomic::AtomicBool,
    /// Slots holding KV state at each successful weight update, in order.
    slots_at_update: Mutex<Vec<usize>>,
    /// The thread each staged checkpoint read ran on.
    stager_threads: Mutex<Vec<String>>,
    /// Checkpoint reads running now, and the most that ever ran at once.
    reads: AtomicUsize,
    peak_reads: AtomicUsize,
}

/// One slot's fake KV: the tokens it caches, in storage that counts itself live while it exists.
struct FakeKv {
    tokens: Vec<TokenId>,
    capacity: usize,
    counters: Arc<Counters>,
}

impl Drop for FakeKv {
    fn drop(&mut self) {
        self.counters
            .live_positions
            .fetch_sub(self.capacity, Ordering::Relaxed);
    }
}

/// Allocates [`FakeKv`]s, counting live and peak positions.
struct FakeStore {
    counters: Arc<Counters>,
}

impl KvStorage for FakeStore {
    type Slot = FakeKv;

    fn allocate(&mut self, capacity: usize) -> Result<FakeKv, BackendError> {
        let live = self
            .counters
            .live_positions
            .fetch_add(capacity, Ordering::Relaxed)
            + capacity;
        self.counters
            .peak_positions
            .fetch_max(live, Ordering::Relaxed);
        Ok(FakeKv {
            tokens: Vec::with_capacity(capacity),
            capacity,
            counters: self.counters.clone(),
        })
    }

    fn copy_prefix(
        &mut self,
        src: &FakeKv,
        dst: &mut FakeKv,
        len: usize,
    ) -> Result<(), BackendError> {
        dst.tokens.clear();
        dst.tokens.extend_from_slice(&src.tokens[..len]);
        Ok(())
    }
}

/// Bytes one fake KV position costs.
const KV_BYTES_PER_TOKEN: u64 = 1024;

/// Given a slot's history, the value to fill its logits row with (`None`: the model's row).
type RowOverride = fn(&[TokenId]) -> Option<f32>;

/// A backend whose KV state is the token history, kept in a [`KvTable`] (granule growth, byte
/// budget) like the real backends'.
struct FakeBackend {
    info: ModelInfo,
    kv: KvTable<FakeKv>,
    store: FakeStore,
    counters: Arc<Counters>,
    /// When set, each forward pass waits for a permit; dropping the sender opens the gate.
    gate: Option<flume::Receiver<()>>,
    /// Whether a chunk holding [`POISON`] fails the forward.
    poison: bool,
    /// Overrides every value of a logits row: given the slot's history, `Some(value)`.
    bad_rows: Option<RowOverride>,
    /// Each forward pass sleeps this long first (a long prefill).
    delay: Option<std::time::Duration>,
    /// The fake's "weights": 0 at start, set by `update_weights` (see [`fake_row`]).
    weights: u32,
    /// A plan to read adapters against (`None`: the fake runs no adapters).
    plan: Option<crate::model::WeightPlan>,
    /// Loaded adapters: each shifts its rows as weights `1000 + id` would.
    adapters: std::collections::HashSet<crate::backend::AdapterId>,
    /// `Some`: updates are read by a [`Backend::weight_stager`], which first waits for a
    /// permit on this channel (or runs freely once its sender is dropped).
    stage_gate: Option<flume::Receiver<()>>,
}

impl FakeBackend {
    fn new(max_context: usize) -> (Self, Arc<Counters>) {
        let counters = Arc::new(Counters::default());
        let info = ModelInfo {
            vocab_size: VOCAB,
            eos_token_ids: vec![EOS],
            max_context,
            dtype: DType::F32,
            device: Device::Cpu,
            kv_bytes_per_token: KV_BYTES_PER_TOKEN,
        };
        (
            Self {
                info,
                kv: KvTable::new(KV_BYTES_PER_TOKEN),
                store: FakeStore {
                    counters: counters.clone(),
                },
                counters: counters.clone(),
                gate: None,
                poison: true,
                bad_rows: None,
                delay: None,
                weights: 0,
                plan: None,
                adapters: Default::default(),
                stage_gate: None,
            },
            counters,
        )
    }

    /// A backend whose forward passes each wait for a permit sent on the returned channel
    /// (all run freely once it is dropped), so a test can queue requests while the engine is
    /// inside a step, or look at the engine between two steps.
    fn gated(max_context: usize) -> (Self, Arc<Counters>, flume::Sender<()>) {
        let (mut backend, counters) = Self::new(max_context);
        let (tx, rx) = flume::unbounded();
        backend.gate = Some(rx);
        (backend, counters, tx)
    }
}

/// The fake model's row under `weights`: [`fake_logits`] at 0, other weights shift every
/// ordinary token's logit by a pattern of their own (POISON and EOS keep theirs).
fn fake_row(history: &[TokenId], weights: u32) -> Vec<f32> {
    let mut row = fake_logits(history);
    if weights > 0 {
        for (j, x) in row.iter_mut().enumerate() {
            if j as TokenId != POISON && j as TokenId != EOS {
                *x += ((j as u32 * 7 + weights * 13) % 5) as f32;
            }
        }
    }
    row
}

/// Logits of the next token given a whole history (never favouring POISON or EOS much).
fn fake_logits(history: &[TokenId]) -> Vec<f32> {
    let h = history
        .iter()
        .fold(17u64, |h, &t| h.wrapping_mul(31).wrapping_add(t as u64 + 1));
    (0..VOCAB)
        .map(|j| {
            let x = ((h.wrapping_mul(j as u64 + 7)) % 1000) as f32 / 250.0;
            let eos_bonus = if history.last() == Some(&BYE) {
                100.0
            } else {
                -3.0
            };
            if j as TokenId == POISON {
                x - 20.0
            } else if j as TokenId == EOS {
                x + eos_bonus
            } else {
                x
            }
        })
        .collect()
}

impl Backend for FakeBackend {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn forward(&mut self, batch: &ForwardBatch) -> Result<Logits, BackendError> {
        if let Some(gate) = &self.gate
            && gate.recv().is_err()
        {
            self.gate = None;
        }
        let step = self.counters.steps.fetch_add(1, Ordering::Relaxed);
        if let Some(delay) = self.delay {
            std::thread::sleep(delay);
        }
        batch.check_adapters(|id| self.adapters.contains(&id))?;
        let mut data = Vec::new();
        for c in &batch.chunks {
            let weights = c
                .adapter
                .map_or(self.weights, |a| self.weights + 1000 + a.0);
            if self.poison && c.tokens.contains(&POISON) {
                return Err(BackendError::Runtime {
                    runtime: "fake",
                    message: "poisoned".into(),
                });
            }
            let cached = self.kv.len(c.slot);
            if cached != c.start_pos {
                return Err(BackendError::PositionMismatch {
                    slot: c.slot,
                    start_pos: c.start_pos,
                    cached,
                });
            }
            if c.start_pos == 0 {
                let mut order = self.counters.prefill_order.lock().unwrap();
                order.push(c.tokens[0]);
                let mut steps = self.counters.prefill_steps.lock().unwrap();
                steps.push((c.tokens[0], step));
            }
            self.kv.reserve(&mut self.store, c.slot, c.tokens.len())?;
            self.counters
                .peak_slots
                .fetch_max(self.kv.num_slots(), Ordering::Relaxed);
            self.counters
                .tokens
                .fetch_add(c.tokens.len(), Ordering::Relaxed);
            let rows = c.logits.rows(c.tokens.len());
            let hist = &mut self.kv.get_mut(c.slot).expect("reserved").storage.tokens;
            for (i, &t) in c.tokens.iter().enumerate() {
                hist.push(t);
                if i + rows >= c.tokens.len() {
                    let mut row = fake_row(hist, weights);
                    if let Some(value) = self.bad_rows.and_then(|f| f(hist)) {
                        row.fill(value);
                    }
                    data.extend(row);
                }
            }
            self.kv.advance(c.slot, c.tokens.len());
        }
        Logits::new(batch, VOCAB, data)
    }

    fn release(&mut self, slot: SlotId) {
        if self
            .counters
            .panic_on_release
            .swap(false, Ordering::Relaxed)
        {
            panic!("fake release bug");
        }
        self.kv.release(slot);
    }

    fn fork_prefix(&mut self, src: SlotId, dst: SlotId, len: usize) -> Result<(), BackendError> {
        self.counters.forks.fetch_add(1, Ordering::Relaxed);
        self.kv.fork_prefix(&mut self.store, src, dst, len)?;
        self.counters
            .peak_slots
            .fetch_max(self.kv.num_slots(), Ordering::Relaxed);
        Ok(())
    }

    fn cached_len(&self, slot: SlotId) -> usize {
        self.kv.len(slot)
    }

    fn kv_usage(&self) -> KvUsage {
        if self.counters.panic_on_kv_usage.load(Ordering::Relaxed) {
            panic!("fake kv_usage bug");
        }
        self.kv.usage()
    }

    fn set_kv_budget(&mut self, bytes: Option<u64>) {
        self.kv.set_budget(bytes);
    }

    fn weight_plan(&self) -> Option<&crate::model::WeightPlan> {
        self.plan.as_ref()
    }

    fn load_adapter(
        &mut self,
        id: crate::backend::AdapterId,
        _adapter: &crate::model::LoraAdapter,
    ) -> Result<(), crate::model::AdapterError> {
        self.adapters.insert(id);
        Ok(())
    }

    fn unload_adapter(&mut self, id: crate::backend::AdapterId) {
        self.adapters.remove(&id);
    }

    fn update_weights(&mut self, dir: &std::path::Path) -> Result<(), WeightUpdateError> {
        if self.stage_gate.is_some() {
            let staged = (self.weight_stager().unwrap())(dir)?;
            return self.install_weights(staged);
        }
        let n = fake_checkpoint(dir)?;
        self.install_weights(Box::new(n))
    }

    fn weight_stager(&self) -> Option<crate::backend::WeightStager> {
        let gate = self.stage_gate.clone()?;
        let counters = self.counters.clone();
        Some(Box::new(move |dir: &std::path::Path| {
            let now = counters.reads.fetch_add(1, Ordering::SeqCst) + 1;
            counters.peak_reads.fetch_max(now, Ordering::SeqCst);
            gate.recv().ok();
            counters.reads.fetch_sub(1, Ordering::SeqCst);
            let thread = std::thread::current().name().unwrap_or("").to_string();
            counters.stager_threads.lock().unwrap().push(thread);
            Ok(Box::new(fake_checkpoint(dir)?) as crate::backend::StagedWeights)
        }))
    }

    fn install_weights(
        &mut self,
        staged: crate::backend::StagedWeights,
    ) -> Result<(), WeightUpdateError> {
        let n = *staged
            .downcast::<u32>()
            .map_err(|_| WeightUpdateError::ForeignStage)?;
        self.counters
            .slots_at_update
            .lock()
            .unwrap()
            .push(self.kv.num_slots());
        self.weights = n;
        Ok(())
    }
}

/// The fake's checkpoints: a folder named `weights-N` holds the weights N; `mismatch` is
/// another model's; `panic` makes the load panic.
fn fake_checkpoint(dir: &std::path::Path) -> Result<u32, WeightUpdateError> {
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    if name == "panic" {
        panic!("fake loader bug");
    }
    name.strip_prefix("weights-")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| WeightUpdateError::Mismatch {
            path: dir.to_path_buf(),
            differences: vec![format!("hidden_size: served 1, checkpoint {name}")],
        })
}

fn engine(config: EngineConfig) -> (Engine, Arc<Counters>) {
    let (backend, counters) = FakeBackend::new(64);
    (Engine::start(backend, config).unwrap(), counters)
}

fn sampled(temperature: f32, seed: u64, max_tokens: usize) -> SamplingParams {
    SamplingParams {
        temperature,
        seed: Some(seed),
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        ..Default::default()
    }
}

#[test]
fn greedy_follows_the_model() {
    let (e, _) = engine(EngineConfig::default());
    let prompt = vec![1, 2, 3];
    let out = e
        .generate(GenerateRequest::new(
            prompt.clone(),
            SamplingParams {
                ignore_eos: true,
                ..SamplingParams::greedy(5)
            },
        ))
        .wait()
        .unwrap();
    let mut hist = prompt;
    for &t in &out.sequences[0].tokens {
        assert_eq!(t, crate::sampling::argmax(&fake_logits(&hist)));
        hist.push(t);
    }
    assert_eq!(out.sequences[0].tokens.len(), 5);
    assert_eq!(out.sequences[0].finish_reason, FinishReason::Length);
}

#[test]
fn seeded_samples_do_not_depend_on_the_batch() {
    let request = GenerateRequest::new(
        vec![5, 6, 7],
        SamplingParams {
            n: 4,
            ..sampled(0.8, 7, 12)
        },
    );
    let (alone, _) = engine(EngineConfig::default());
    let expected = alone.generate(request.clone()).wait().unwrap();
    let (busy, _) = engine(EngineConfig {
        max_num_seqs: 16,
        max_num_batched_tokens: 5,
        ..EngineConfig::default()
    });
    let others: Vec<_> = (0..8)
        .map(|i| {
            busy.generate(GenerateRequest::new(
                vec![i + 1; 3 + i as usize],
                sampled(1.0, i as u64, 9),
            ))
        })
        .collect();
    let got = busy.generate(request).wait().unwrap();
    assert_eq!(got.sequences, expected.sequences);
    let distinct: std::collections::HashSet<_> =
        got.sequences.iter().map(|s| s.tokens.clone()).collect();
    assert!(distinct.len() > 1, "samples of one request must differ");
    for o in others {
        o.wait().unwrap();
    }
}

#[test]
fn samples_share_one_prefill_via_fork() {
    let (e, counters) = engine(EngineConfig::default());
    let prompt: Vec<TokenId> = (0..20).collect();
    let out = e
        .generate(GenerateRequest::new(
            prompt,
            SamplingParams {
                n: 4,
                ..sampled(1.0, 1, 3)
            },
        ))
        .wait()
        .unwrap();
    assert_eq!(out.sequences.len(), 4);
    assert_eq!(counters.forks.load(Ordering::Relaxed), 3);
    // 20 prompt tokens once, then 2 decode steps per sample (the 3rd token is never fed back).
    assert_eq!(counters.tokens.load(Ordering::Relaxed), 20 + 4 * 2);
}

#[test]
fn chunked_prefill_gives_the_same_prompt_logprobs() {
    let prompt: Vec<TokenId> = (0..23).map(|i| (i * 7) % 29).collect();
    let (whole, _) = engine(EngineConfig::default());
    let (chunked, _) = engine(EngineConfig {
        max_num_seqs: 4,
        max_num_batched_tokens: 4,
        ..EngineConfig::default()
    });
    let a = whole.score(&prompt.clone().into()).wait().unwrap();
    let b = chunked.score(&prompt.clone().into()).wait().unwrap();
    let lp = a.prompt_logprobs.clone().unwrap();
    assert_eq!(lp.len(), prompt.len());
    assert_eq!(lp[0], None);
    assert!(lp[1..].iter().all(Option::is_some));
    assert_eq!(a.prompt_logprobs, b.prompt_logprobs);
    assert!(a.sequences.is_empty());
    let expected = crate::sampling::token_logprob(&fake_logits(&prompt[..5]), prompt[5]);
    assert_eq!(lp[5], Some(expected));
}

#[test]
fn sampled_logprobs_equal_scoring() {
    let (e, _) = engine(EngineConfig::default());
    let prompt = vec![3, 1, 4, 1, 5];
    let out = e
        .generate(GenerateRequest::new(prompt.clone(), sampled(1.0, 11, 8)))
        .wait()
        .unwrap();
    let seq = &out.sequences[0];
    let mut full = prompt.clone();
    full.extend(&seq.tokens);
    let scored = e
        .score(&full.into())
        .wait()
        .unwrap()
        .prompt_logprobs
        .unwrap();
    for (i, lp) in seq.logprobs.iter().enumerate() {
        assert_eq!(scored[prompt.len() + i], Some(*lp));
    }
}

#[test]
fn top_logprobs_and_processed_logprobs_are_returned() {
    let (e, _) = engine(EngineConfig::default());
    let params = SamplingParams {
        logprobs: Some(3),
        logprobs_mode: crate::LogprobsMode::RawAndProcessed,
        top_k: 2,
        ..sampled(1.0, 2, 4)
    };
    let req = GenerateRequest {
        prompt_logprobs: PromptLogprobs {
            include: true,
            top_k: 2,
        },
        ..GenerateRequest::new(vec![1, 2, 3], params)
    };
    let out = e.generate(req).wait().unwrap();
    let seq = &out.sequences[0];
    let top = seq.top_logprobs.as_ref().unwrap();
    assert_eq!(top.len(), 4);
    assert!(top.iter().all(|t| t.len() == 3));
    let processed = seq.processed_logprobs.as_ref().unwrap();
    // With top_k = 2 the processed distribution has mass only on two tokens: logprob >= ln(1/2)
    // for the likelier and the raw logprob is lower than the processed one.
    assert!(processed.iter().zip(&seq.logprobs).all(|(p, r)| p > r));
    let tp = out.topk_prompt_logprobs.unwrap();
    assert_eq!(tp[0], None);
    assert_eq!(tp[1].as_ref().unwrap().len(), 2);
}

#[test]
fn eos_and_stop_tokens_finish_sequences() {
    let (e, _) = engine(EngineConfig::default());
    let prompt = vec![1, 2];
    let first = crate::sampling::argmax(&fake_logits(&prompt));
    let stop = SamplingParams {
        stop_token_ids: vec![first],
        ..SamplingParams::greedy(10)
    };
    let out = e
        .generate(GenerateRequest::new(prompt, stop))
        .wait()
        .unwrap();
    assert_eq!(out.sequences[0].tokens, vec![first]);
    assert_eq!(out.sequences[0].finish_reason, FinishReason::StopToken);
    let eos = e
        .generate(GenerateRequest::new(
            vec![1, BYE],
            SamplingParams::greedy(10),
        ))
        .wait()
        .unwrap();
    assert_eq!(
        (
            eos.sequences[0].tokens.clone(),
            eos.sequences[0].finish_reason
        ),
        (vec![EOS], FinishReason::Eos)
    );
    let ignored = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(3)
    };
    let out = e
        .generate(GenerateRequest::new(vec![1, BYE], ignored))
        .wait()
        .unwrap();
    assert_eq!(out.sequences[0].tokens.len(), 3);
    assert_eq!(out.sequences[0].tokens[0], EOS);
    assert_eq!(out.sequences[0].finish_reason, FinishReason::Length);
}

#[test]
fn bad_requests_get_typed_errors_and_the_engine_keeps_serving() {
    let (e, _) = engine(EngineConfig {
        max_num_seqs: 8,
        max_num_batched_tokens: 16,
        ..EngineConfig::default()
    });
    let submit = |prompt: ModelInput, params: SamplingParams| {
        e.generate(GenerateRequest {
            prompt,
            ..GenerateRequest::new(vec![], params)
        })
        .wait()
    };
    let ok = SamplingParams::greedy(2);
    let err = submit(vec![1, VOCAB as TokenId].into(), ok.clone()).unwrap_err();
    assert_eq!(
        err,
        EngineError::Invalid(ValidationError::TokenOutOfRange {
            token: VOCAB as u32,
            position: 1,
            vocab_size: VOCAB
        })
    );
    assert_eq!(
        submit(vec![].into(), ok.clone()).unwrap_err(),
        EngineError::Invalid(ValidationError::EmptyPrompt)
    );
    let field = |r: Result<GenerateOutput, EngineError>| match r {
        Err(EngineError::Invalid(ValidationError::InvalidField { field, .. })) => field,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        field(submit(
            vec![1].into(),
            SamplingParams {
                temperature: -1.0,
                ..ok.clone()
            }
        )),
        "temperature"
    );
    assert_eq!(
        field(submit(
            vec![1].into(),
            SamplingParams {
                top_p: 1.5,
                ..ok.clone()
            }
        )),
        "top_p"
    );
    let overflow = submit(vec![1; 60].into(), SamplingParams::greedy(5)).unwrap_err();
    assert_eq!(
        overflow,
        EngineError::Invalid(ValidationError::ContextOverflow {
            prompt_len: 60,
            max_tokens: 5,
            max_context: 64
        })
    );
    let image = ModelInput::from_ints(vec![1]).with_chunk(ModelInputChunk::Image(ImageChunk {
        data: vec![],
        format: ImageFormat::Jpeg,
        expected_tokens: None,
    }));
    assert!(matches!(
        submit(image, ok.clone()).unwrap_err(),
        EngineError::Invalid(ValidationError::UnsupportedChunk { index: 1, .. })
    ));
    let too_many = e
        .generate(GenerateRequest::new(
            vec![1],
            SamplingParams { n: 9, ..ok.clone() },
        ))
        .wait();
    assert_eq!(field(too_many), "n");
    // A request that makes the backend fail gets the backend's error; a concurrent one is served.
    let poisoned = e.generate(GenerateRequest::new(vec![1, POISON], ok.clone()));
    let healthy = e.generate(GenerateRequest::new(vec![1, 2], ok.clone()));
    assert!(matches!(
        poisoned.wait(),
        Err(EngineError::Backend(BackendError::Runtime { .. }))
    ));
    let healthy = healthy.wait();
    // The healthy request may have shared the failed batch; if so it fails too, but a retry works.
    if healthy.is_err() {
        e.generate(GenerateRequest::new(vec![1, 2], ok.clone()))
            .wait()
            .unwrap();
    }
    e.generate(GenerateRequest::new(vec![4, 5], ok))
        .wait()
        .unwrap();
    let stats = e.stats().unwrap();
    assert_eq!(
        (
            stats.free_slots,
            stats.running_requests,
            stats.waiting_requests
        ),
        (8, 0, 0)
    );
}

#[test]
fn dropping_a_pending_request_frees_its_slots() {
    let (e, _) = engine(EngineConfig {
        max_num_seqs: 4,
        max_num_batched_tokens: 8,
        ..EngineConfig::default()
    });
    let long = e.generate(GenerateRequest::new(
        vec![1, 2],
        SamplingParams {
            n: 4,
            ..sampled(1.0, 3, 60)
        },
    ));
    drop(long);
    // The next request needs all four slots, so it only completes once the dropped one is gone.
    let out = e
        .generate(GenerateRequest::new(
            vec![3],
            SamplingParams {
                n: 4,
                ..sampled(1.0, 4, 2)
            },
        ))
        .wait()
        .unwrap();
    assert_eq!(out.sequences.len(), 4);
    let stats = e.stats().unwrap();
    assert_eq!(
        (
            stats.free_slots,
            stats.kv_reserved_bytes,
            stats.kv_allocated_bytes
        ),
        (4, 0, 0)
    );
}

#[test]
fn async_await_works_without_a_runtime_dependency() {
    let (e, _) = engine(EngineConfig::default());
    let fut = e.generate(GenerateRequest::new(vec![1, 2], SamplingParams::greedy(3)));
    let out = pending_block_on(fut).unwrap();
    assert_eq!(out.sequences[0].tokens.len(), 3);
}

/// Polls a future to completion with a thread-parking waker (what an executor does).
fn pending_block_on<F: std::future::Future>(fut: F) -> F::Output {
    use std::task::{Context, Poll, Wake, Waker};
    struct W(std::thread::Thread);
    impl Wake for W {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let mut fut = std::pin::pin!(fut);
    let waker = Waker::from(Arc::new(W(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

mod adapters;
mod control;
mod fields;
mod hostile;
mod kv_budget;
mod prefix;
mod props;
