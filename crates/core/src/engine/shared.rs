//! What the engine thread publishes for its handles: a snapshot of its numbers, the count of
//! submissions not yet admitted, whether the thread is still alive, whether it is paused, and
//! the version of the weights it serves. [`Engine::stats`]
//! reads them without waiting on the engine thread, so `/health` and `/metrics` answer in
//! microseconds even during a long prefill.
//!
//! [`Engine::stats`]: crate::engine::Engine::stats

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::engine::scheduler::EngineStats;
use crate::error::EngineError;

/// Shared between the handles and the engine thread.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Submissions not yet admitted: counted by the handle when it sends a job, taken off by
    /// the engine thread when it admits, cancels or rejects one, so queue depth is fresh
    /// whatever the engine is doing.
    waiting: AtomicUsize,
    /// The scheduler's numbers as of its last publish (after each command drain, admission
    /// and step).
    snapshot: Mutex<EngineStats>,
    /// Set when the engine thread exits, normally or by a panic.
    exited: AtomicBool,
    /// When the engine thread last published (it publishes before every step), so a reader
    /// can tell a busy engine that makes progress from one stuck inside a step.
    published_at: Mutex<Option<Instant>>,
    /// Whether generation is paused (set and cleared by the engine thread).
    paused: AtomicBool,
    /// Successful weight updates since start.
    weight_updates: AtomicU64,
    /// The version of the weights served: `None` before any update (read as `"0"`).
    weight_version: Mutex<Option<String>>,
}

impl Shared {
    /// A handle is about to send a job.
    pub fn submitted(&self) {
        self.waiting.fetch_add(1, Ordering::SeqCst);
    }

    /// A job left the waiting queue (admitted, cancelled, rejected) or was never sent.
    pub fn left_queue(&self) {
        // Never below zero, even if a caller miscounts.
        let _ = self
            .waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| w.checked_sub(1));
    }

    /// Replaces the snapshot (its `waiting_requests` is ignored: the counter is fresher).
    pub fn publish(&self, stats: EngineStats) {
        *self.snapshot.lock().unwrap_or_else(PoisonError::into_inner) = stats;
        *self
            .published_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
    }

    /// Time since the engine thread last published (`None` before its first publish).
    pub fn since_publish(&self) -> Option<Duration> {
        self.published_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map(|at| at.elapsed())
    }

    /// The latest snapshot with the live queue depth, or `Shutdown` once the engine thread
    /// has exited.
    pub fn read(&self) -> Result<EngineStats, EngineError> {
        if self.exited.load(Ordering::SeqCst) {
            return Err(EngineError::Shutdown);
        }
        let mut stats = *self.snapshot.lock().unwrap_or_else(PoisonError::into_inner);
        stats.waiting_requests = self.waiting.load(Ordering::SeqCst);
        Ok(stats)
    }
}

impl Shared {
    /// Records whether generation is paused.
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
    }

    /// Whether generation is paused.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Counts a successful weight update and sets the version: `given`, else the count.
    pub fn bump_weight_version(&self, given: Option<String>) -> String {
        let n = self.weight_updates.fetch_add(1, Ordering::SeqCst) + 1;
        let version = given.unwrap_or_else(|| n.to_string());
        *self
            .weight_version
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(version.clone());
        version
    }

    /// The version of the weights served (`"0"`: those loaded at start).
    pub fn weight_version(&self) -> String {
        self.weight_version
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_else(|| "0".to_string())
    }

    /// Successful weight updates since start.
    pub fn weight_updates(&self) -> u64 {
        self.weight_updates.load(Ordering::SeqCst)
    }
}

/// Marks the engine thread as exited when dropped: on return and while unwinding a panic.
pub(crate) struct ExitGuard(pub Arc<Shared>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        self.0.exited.store(true, Ordering::SeqCst);
    }
}
