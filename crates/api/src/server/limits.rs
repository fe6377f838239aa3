//! Request limits: body size, concurrency with a bounded waiting queue, per-request timeout.
//!
//! Admission counts requests and sequences: a request takes one of `max_concurrent_requests`
//! request places and as many of `max_concurrent_sequences` sequence places as it keeps in the
//! engine at once (prompts in its submission window × samples drawn per prompt), so one request
//! with hundreds of prompts takes as many places as it uses and cannot pass for one.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::error::ApiError;

/// What one server accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests served at once (the engine batches them); more wait in the queue.
    pub max_concurrent_requests: usize,
    /// Sequences served at once, summed over requests: a request weighs the sequences it keeps
    /// in the engine at once (a plain one 1). More wait in the queue.
    pub max_concurrent_sequences: usize,
    /// Most sequences one request may ask for (prompts × samples drawn); 400 beyond.
    pub max_sequences_per_request: usize,
    /// Requests that may wait for a concurrency slot; past that the server answers 429.
    pub max_queue: usize,
    /// Largest request body, in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Wall-clock limit of one request, queueing included (504 beyond); `None`: no limit.
    pub request_timeout: Option<Duration>,
    /// Interval of SSE keep-alive comments while a stream has nothing to send (waiting in the
    /// engine's queue, behind a long prefill); `None`: none.
    pub sse_keep_alive: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_concurrent_requests: 64,
            max_concurrent_sequences: 256,
            max_sequences_per_request: 256,
            max_queue: 256,
            max_body_bytes: 8 << 20,
            request_timeout: Some(Duration::from_secs(600)),
            sse_keep_alive: Some(Duration::from_secs(15)),
        }
    }
}

/// Most places one request can hold (tokio's semaphores take `u32` permit counts).
const MAX_PLACES: usize = 1 << 24;

/// Admission control: a semaphore of request places, one of sequence places, and a bounded
/// queue. A request takes its request place first, then its sequence places, both in arrival
/// order.
#[derive(Debug)]
pub(crate) struct Admission {
    requests: Arc<Semaphore>,
    capacity: usize,
    sequences: Arc<Semaphore>,
    sequence_capacity: usize,
    /// Sequence places held by admitted requests.
    sequences_held: Arc<AtomicUsize>,
    /// Requests holding places now.
    running: Arc<AtomicUsize>,
    queued: AtomicUsize,
    max_queue: usize,
    timeout: Option<Duration>,
}

/// A request's held places; dropping it admits the next queued requests.
#[derive(Debug)]
pub(crate) struct Permit {
    _request: OwnedSemaphorePermit,
    sequences: OwnedSemaphorePermit,
    running: Arc<AtomicUsize>,
    sequences_held: Arc<AtomicUsize>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.running.fetch_sub(1, Ordering::SeqCst);
        self.sequences_held
            .fetch_sub(self.sequences.num_permits(), Ordering::SeqCst);
    }
}

/// Decrements the queue count when a waiting request leaves the queue (admitted or dropped).
struct Queued<'a>(&'a AtomicUsize);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Admission {
    pub(crate) fn new(limits: &Limits) -> Self {
        let capacity = limits.max_concurrent_requests.clamp(1, MAX_PLACES);
        let sequence_capacity = limits.max_concurrent_sequences.clamp(1, MAX_PLACES);
        Self {
            requests: Arc::new(Semaphore::new(capacity)),
            capacity,
            sequences: Arc::new(Semaphore::new(sequence_capacity)),
            sequence_capacity,
            sequences_held: Arc::default(),
            running: Arc::default(),
            queued: AtomicUsize::new(0),
            max_queue: limits.max_queue,
            timeout: limits.request_timeout,
        }
    }

    /// The deadline of a request that starts now (none for a timeout past the clock's range).
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.timeout.and_then(|t| Instant::now().checked_add(t))
    }

    /// Waits for a request place and `weight` sequence places (at most the capacity, so a
    /// heavy request runs alone rather than never), or fails at once with 429 when the queue
    /// is full. Waiters are served in arrival order.
    pub(crate) async fn admit(&self, weight: usize) -> Result<Permit, ApiError> {
        let places = weight.clamp(1, self.sequence_capacity) as u32;
        let now = self
            .requests
            .clone()
            .try_acquire_owned()
            .ok()
            .and_then(|request| {
                let sequences = self.sequences.clone().try_acquire_many_owned(places).ok()?;
                Some((request, sequences))
            });
        let (request, sequences) = match now {
            Some(held) => held,
            None => {
                let before = self.queued.fetch_add(1, Ordering::SeqCst);
                let _queued = Queued(&self.queued);
                if before >= self.max_queue {
                    return Err(ApiError::overloaded());
                }
                let closed = |_| ApiError::internal("the server is shutting down");
                let request = self
                    .requests
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(closed)?;
                let sequences = self
                    .sequences
                    .clone()
                    .acquire_many_owned(places)
                    .await
                    .map_err(closed)?;
                (request, sequences)
            }
        };
        self.running.fetch_add(1, Ordering::SeqCst);
        self.sequences_held
            .fetch_add(sequences.num_permits(), Ordering::SeqCst);
        Ok(Permit {
            _request: request,
            sequences,
            running: self.running.clone(),
            sequences_held: self.sequences_held.clone(),
        })
    }

    /// Runs `work` under `weight` places and the deadline (504 past it).
    pub(crate) async fn run<T, F>(
        &self,
        deadline: Option<Instant>,
        weight: usize,
        work: F,
    ) -> Result<T, ApiError>
    where
        F: Future<Output = Result<T, ApiError>>,
    {
        let admitted = async {
            let _permit = self.admit(weight).await?;
            work.await
        };
        self.within(deadline, admitted).await
    }

    /// Runs `fut` until `deadline`; past it the future is dropped (which cancels engine work).
    pub(crate) async fn within<T, F>(
        &self,
        deadline: Option<Instant>,
        fut: F,
    ) -> Result<T, ApiError>
    where
        F: Future<Output = Result<T, ApiError>>,
    {
        match deadline {
            None => fut.await,
            Some(at) => tokio::time::timeout_at(at, fut)
                .await
                .unwrap_or_else(|_| Err(self.timeout_error())),
        }
    }

    /// The 504 error of this server's timeout.
    pub(crate) fn timeout_error(&self) -> ApiError {
        ApiError::timeout(self.timeout.map_or(0.0, |t| t.as_secs_f64()))
    }

    /// Requests holding places now.
    pub(crate) fn in_flight(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// Sequence places held now by admitted requests (not those handed to a waiter that is
    /// still short of its weight).
    pub(crate) fn places_in_use(&self) -> usize {
        self.sequences_held.load(Ordering::SeqCst)
    }

    /// Requests waiting for a slot now.
    pub(crate) fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// `max_concurrent_requests`.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_rejects_with_429_and_frees_places() {
        let limits = Limits {
            max_concurrent_requests: 1,
            max_queue: 1,
            ..Limits::default()
        };
        let admission = Arc::new(Admission::new(&limits));
        let first = admission.admit(1).await.unwrap();
        let waiting = {
            let a = admission.clone();
            tokio::spawn(async move { a.admit(1).await.map(drop) })
        };
        while admission.queued() == 0 {
            tokio::task::yield_now().await;
        }
        let rejected = admission.admit(1).await.unwrap_err();
        assert_eq!(rejected.status, axum::http::StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(rejected.retry_after, Some(1));
        drop(first);
        waiting.await.unwrap().unwrap();
        assert_eq!(admission.queued(), 0);
        assert_eq!(admission.in_flight(), 0);
    }
}

#[cfg(test)]
mod weight_tests {
    use super::*;

    #[tokio::test]
    async fn requests_weigh_their_sequences_and_heavy_ones_run_alone() {
        let limits = Limits {
            max_concurrent_sequences: 8,
            max_queue: 4,
            ..Limits::default()
        };
        let admission = Arc::new(Admission::new(&limits));
        let six = admission.admit(6).await.unwrap();
        assert_eq!(admission.places_in_use(), 6);
        let two = admission.admit(2).await.unwrap();
        assert_eq!((admission.in_flight(), admission.places_in_use()), (2, 8));
        // A third request does not fit until places free up.
        let waiting = {
            let a = admission.clone();
            tokio::spawn(async move { a.admit(3).await.map(drop) })
        };
        while admission.queued() == 0 {
            tokio::task::yield_now().await;
        }
        drop(two);
        tokio::task::yield_now().await;
        assert_eq!(admission.queued(), 1, "3 places do not fit in the 2 freed");
        drop(six);
        waiting.await.unwrap().unwrap();
        // Heavier than the capacity: admitted alone, not never.
        let heavy = admission.admit(1000).await.unwrap();
        assert_eq!(admission.places_in_use(), 8);
        drop(heavy);
        assert_eq!((admission.in_flight(), admission.places_in_use()), (0, 0));
        assert_eq!(admission.queued(), 0);
    }

    #[tokio::test]
    async fn requests_are_counted_apart_from_their_sequences() {
        let limits = Limits {
            max_concurrent_requests: 2,
            max_concurrent_sequences: 100,
            max_queue: 4,
            ..Limits::default()
        };
        let admission = Arc::new(Admission::new(&limits));
        let a = admission.admit(1).await.unwrap();
        let b = admission.admit(1).await.unwrap();
        let waiting = {
            let a = admission.clone();
            tokio::spawn(async move { a.admit(1).await.map(drop) })
        };
        while admission.queued() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!((admission.in_flight(), admission.places_in_use()), (2, 2));
        drop(a);
        waiting.await.unwrap().unwrap();
        drop(b);
        assert_eq!((admission.in_flight(), admission.places_in_use()), (0, 0));
    }

    #[test]
    fn a_timeout_past_the_clock_means_no_deadline() {
        let admission = Admission::new(&Limits {
            request_timeout: Some(Duration::from_secs(u64::MAX)),
            ..Limits::default()
        });
        assert_eq!(admission.deadline(), None);
    }
}
