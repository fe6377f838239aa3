//! Control commands of a running engine: replacing its weights from disk, pausing and resuming
//! generation. They are processed on the engine thread between steps.
//!
//! A weight update swaps only while no request runs, so no request ever mixes weights:
//! - [`UpdateMode::Drain`] stops admitting (new and queued requests wait), lets the running
//!   ones finish on the old weights, then swaps and admits again;
//! - [`UpdateMode::Abort`] ends every running and queued request at once with
//!   [`EngineError::Aborted`], then swaps.
//!
//! A pause stops stepping: running requests keep their KV state and wait, new ones queue. A
//! drain-mode update sent while paused still lets the running requests finish (that is what it
//! asks for), swaps, and leaves the engine paused.
//!
//! [`EngineError::Aborted`]: crate::error::EngineError::Aborted

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, StagedWeights, WeightStager, WeightUpdateError};
use crate::engine::Command;
use crate::engine::scheduler::Scheduler;
use crate::sampling::batch::panic_message;

/// What a weight update does with the requests in flight.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateMode {
    /// Running requests finish on the old weights; queued and new ones wait for the new.
    #[default]
    Drain,
    /// Running and queued requests end at once with `EngineError::Aborted`.
    Abort,
}

/// A request to replace an engine's weights with a checkpoint on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightUpdate {
    /// The Hugging Face folder of the new weights (the served model's config and shapes).
    pub path: PathBuf,
    /// What happens to the requests in flight.
    pub mode: UpdateMode,
    /// The version the new weights are known by (default: the number of updates so far).
    pub weight_version: Option<String>,
    /// Leave the engine paused after the swap (SGLang's `keep_pause`): requests that queued
    /// during the update wait for a resume.
    pub keep_paused: bool,
}

impl WeightUpdate {
    /// An update from `path` in `mode`, versioned by the update counter.
    pub fn new(path: impl Into<PathBuf>, mode: UpdateMode) -> Self {
        Self {
            path: path.into(),
            mode,
            weight_version: None,
            keep_paused: false,
        }
    }
}

/// What a successful weight update did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightUpdateReport {
    /// The engine's weight version now.
    pub weight_version: String,
    /// Requests that were running when the update arrived and finished on the old weights
    /// (drain mode).
    pub drained_requests: usize,
    /// Requests ended by the update (abort mode).
    pub aborted_requests: usize,
    /// Requests that waited in the queue during the swap; they run on the new weights.
    pub held_requests: usize,
    /// Seconds from the update's arrival to the swap: reading the new weights (on a thread
    /// of its own where the backend has a stager, while running requests drain) and the swap.
    pub load_seconds: f64,
}

/// What a pause does with the requests in flight.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PauseMode {
    /// Running requests keep their state and wait; queued and new ones wait too.
    #[default]
    InPlace,
    /// Running and queued requests end at once with `EngineError::Aborted`; new ones wait.
    Abort,
}

/// What a pause did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseReport {
    /// Requests ended by the pause (abort mode).
    pub aborted_requests: usize,
    /// Requests that were running and now wait (in-place mode).
    pub paused_requests: usize,
}

/// A weight update on the engine thread: the request, its reply, what it waited for, and
/// the new weights a stager thread is reading meanwhile (`None`: the backend loads at the swap).
pub(crate) struct PendingUpdate {
    pub request: WeightUpdate,
    pub reply: flume::Sender<Result<WeightUpdateReport, WeightUpdateError>>,
    pub drained: usize,
    pub aborted: usize,
    started: Instant,
    staging: Option<Staging>,
}

/// A stager thread's result.
type Staging = flume::Receiver<Result<StagedWeights, WeightUpdateError>>;

/// Starts `stage` on its own thread; its result arrives on the returned channel, and `wake`
/// (the engine's command channel, held weakly so it never keeps the engine alive) gets a
/// [`Command::Wake`] so an engine waiting for it swaps at once. `after`, the read of an update
/// this one replaced, is waited for and dropped first, so at most one checkpoint is being
/// read and held besides the serving weights. `None` if no thread could be spawned: the
/// backend then loads at the swap.
fn spawn_stager(
    stage: WeightStager,
    path: PathBuf,
    wake: flume::WeakSender<Command>,
    after: Option<Staging>,
) -> Option<Staging> {
    let (tx, rx) = flume::bounded(1);
    let run = move || {
        if let Some(replaced) = after {
            drop(replaced.recv());
        }
        let staged = catch_unwind(AssertUnwindSafe(|| stage(&path)))
            .unwrap_or_else(|panic| Err(WeightUpdateError::Panicked(panic_message(panic))));
        // A replaced update's receiver is held by the read that replaced it, which drops
        // these weights unused.
        if tx.send(staged).is_ok()
            && let Some(engine) = wake.upgrade()
        {
            drop(engine.send(Command::Wake));
        }
    };
    std::thread::Builder::new()
        .name("infermux-weights".into())
        .spawn(run)
        .ok()
        .map(|_| rx)
}

/// `by` of the `Aborted` errors a weight update sends.
pub(crate) const ABORTED_BY_UPDATE: &str = "a weight update (abort_all_requests)";
/// `by` of the `Aborted` errors an aborting pause sends.
pub(crate) const ABORTED_BY_PAUSE: &str = "a pause of generation (mode abort)";

/// The scheduler's pause flag and the weight update waiting to swap.
#[derive(Default)]
pub(crate) struct ControlState {
    paused: bool,
    update: Option<PendingUpdate>,
}

impl ControlState {
    /// Whether queued requests may be admitted: not paused, no update waiting to swap.
    pub fn admitting(&self) -> bool {
        !self.paused && self.update.is_none()
    }

    /// Whether running requests may step: not paused, or draining for an update.
    pub fn may_step(&self) -> bool {
        !self.paused || self.update.is_some()
    }

    /// Whether generation is paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }
}

impl Scheduler {
    /// Pauses generation; in abort mode every running and queued request ends first.
    pub fn pause(&mut self, backend: &mut dyn Backend, mode: PauseMode) -> PauseReport {
        let report = match mode {
            PauseMode::InPlace => PauseReport {
                aborted_requests: 0,
                paused_requests: self.running_len(),
            },
            PauseMode::Abort => PauseReport {
                aborted_requests: self.abort_all(backend, ABORTED_BY_PAUSE),
                paused_requests: 0,
            },
        };
        self.set_paused(true);
        report
    }

    /// Resumes generation (a no-op when not paused).
    pub fn resume(&mut self) {
        self.set_paused(false);
    }

    fn set_paused(&mut self, paused: bool) {
        self.control.paused = paused;
        self.shared().set_paused(paused);
    }

    /// Takes a weight update; in abort mode every running and queued request ends now. While
    /// another one waits for requests to drain, a drain-mode update is refused and an
    /// abort-mode one replaces it (so a drain stuck behind a long request can be forced). The
    /// swap happens in [`Scheduler::apply_update`] once nothing runs.
    pub fn begin_update(
        &mut self,
        backend: &mut dyn Backend,
        request: WeightUpdate,
        reply: flume::Sender<Result<WeightUpdateReport, WeightUpdateError>>,
        wake: &flume::WeakSender<Command>,
    ) {
        if self.control.update.is_some() && request.mode == UpdateMode::Drain {
            drop(reply.send(Err(WeightUpdateError::InProgress)));
            return;
        }
        let mut replaced = None;
        if let Some(old) = self.control.update.take() {
            drop(old.reply.send(Err(WeightUpdateError::Superseded)));
            replaced = old.staging;
        }
        let (drained, aborted) = match request.mode {
            UpdateMode::Drain => (self.running_len(), 0),
            UpdateMode::Abort => (0, self.abort_all(backend, ABORTED_BY_UPDATE)),
        };
        // The new weights are read while the running requests drain on the old ones.
        let staging = backend
            .weight_stager()
            .and_then(|stage| spawn_stager(stage, request.path.clone(), wake.clone(), replaced));
        self.control.update = Some(PendingUpdate {
            request,
            reply,
            drained,
            aborted,
            started: Instant::now(),
            staging,
        });
    }

    /// Swaps in the waiting update's weights once no request runs (so no KV state computed with
    /// the old weights survives), and replies; the engine admits again afterwards (or stays
    /// paused: `keep_paused`, or it was paused before). A failed load keeps the old weights.
    pub fn apply_update(&mut self, backend: &mut dyn Backend) {
        if self.running_len() > 0 {
            return;
        }
        let staged = match self.control.update.as_ref().map(|u| &u.staging) {
            None => return,
            Some(None) => None,
            Some(Some(staging)) => match staging.try_recv() {
                Ok(staged) => Some(staged),
                // Still reading: a `Command::Wake` comes when it is done.
                Err(flume::TryRecvError::Empty) => return,
                Err(flume::TryRecvError::Disconnected) => Some(Err(WeightUpdateError::Panicked(
                    "the weight-loading thread ended without a result".into(),
                ))),
            },
        };
        let Some(update) = self.control.update.take() else {
            return;
        };
        let result = match staged {
            // A checkpoint that failed to read never touches the serving weights or the cache.
            Some(Err(e)) => Err(e),
            staged => {
                // Cached prefixes hold KV computed with the old weights.
                self.flush_prefix_cache(backend);
                let path = &update.request.path;
                catch_unwind(AssertUnwindSafe(|| match staged {
                    Some(Ok(weights)) => backend.install_weights(weights),
                    _ => backend.update_weights(path),
                }))
                .unwrap_or_else(|panic| Err(WeightUpdateError::Panicked(panic_message(panic))))
            }
        };
        let started = update.started;
        let reply = result.map(|()| {
            let weight_version = self
                .shared()
                .bump_weight_version(update.request.weight_version.clone());
            if update.request.keep_paused {
                self.set_paused(true);
            }
            WeightUpdateReport {
                weight_version,
                drained_requests: update.drained,
                aborted_requests: update.aborted,
                held_requests: self.waiting_len(),
                load_seconds: started.elapsed().as_secs_f64(),
            }
        });
        self.publish(&*backend);
        drop(update.reply.send(reply));
    }
}
