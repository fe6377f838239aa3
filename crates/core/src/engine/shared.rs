//! What the engine thread publishes for its handles: a snapshot of its numbers, the count of
//! submissions not yet admitted, and whether the thread is still alive. [`Engine::stats`]
//! reads them without waiting on the engine thread, so `/health` and `/metrics` answer in
//! microseconds even during a long prefill.
//!
//! [`Engine::stats`]: crate::engine::Engine::stats

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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

/// Marks the engine thread as exited when dropped: on return and while unwinding a panic.
pub(crate) struct ExitGuard(pub Arc<Shared>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        self.0.exited.store(true, Ordering::SeqCst);
    }
}
