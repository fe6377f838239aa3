//! Request limits: body size, concurrency with a bounded waiting queue, per-request timeout.

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
    /// Generation requests served at once (the engine batches them); more wait in the queue.
    pub max_concurrent_requests: usize,
    /// Requests that may wait for a concurrency slot; past that the server answers 429.
    pub max_queue: usize,
    /// Largest request body, in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Wall-clock limit of one request, queueing included (504 beyond); `None`: no limit.
    pub request_timeout: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_concurrent_requests: 64,
            max_queue: 256,
            max_body_bytes: 8 << 20,
            request_timeout: Some(Duration::from_secs(600)),
        }
    }
}

/// Admission control: a semaphore of `max_concurrent_requests` permits and a bounded queue.
#[derive(Debug)]
pub(crate) struct Admission {
    permits: Arc<Semaphore>,
    capacity: usize,
    queued: AtomicUsize,
    max_queue: usize,
    timeout: Option<Duration>,
}

/// A held concurrency slot; dropping it admits the next queued request.
pub(crate) type Permit = OwnedSemaphorePermit;

/// Decrements the queue count when a waiting request leaves the queue (admitted or dropped).
struct Queued<'a>(&'a AtomicUsize);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Admission {
    pub(crate) fn new(limits: &Limits) -> Self {
        let capacity = limits.max_concurrent_requests.max(1);
        Self {
            permits: Arc::new(Semaphore::new(capacity)),
            capacity,
            queued: AtomicUsize::new(0),
            max_queue: limits.max_queue,
            timeout: limits.request_timeout,
        }
    }

    /// The deadline of a request that starts now.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.timeout.map(|t| Instant::now() + t)
    }

    /// Waits for a concurrency slot, or fails at once with 429 when the queue is full.
    pub(crate) async fn admit(&self) -> Result<Permit, ApiError> {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let before = self.queued.fetch_add(1, Ordering::SeqCst);
        let _queued = Queued(&self.queued);
        if before >= self.max_queue {
            return Err(ApiError::overloaded());
        }
        self.permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ApiError::internal("the server is shutting down"))
    }

    /// Runs `work` under a concurrency slot and the deadline (504 past it).
    pub(crate) async fn run<T, F>(&self, deadline: Option<Instant>, work: F) -> Result<T, ApiError>
    where
        F: Future<Output = Result<T, ApiError>>,
    {
        let admitted = async {
            let _permit = self.admit().await?;
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

    /// Requests holding a concurrency slot now.
    pub(crate) fn in_flight(&self) -> usize {
        self.capacity - self.permits.available_permits()
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
        let first = admission.admit().await.unwrap();
        let waiting = {
            let a = admission.clone();
            tokio::spawn(async move { a.admit().await.map(drop) })
        };
        while admission.queued() == 0 {
            tokio::task::yield_now().await;
        }
        let rejected = admission.admit().await.unwrap_err();
        assert_eq!(rejected.status, axum::http::StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(rejected.retry_after, Some(1));
        drop(first);
        waiting.await.unwrap().unwrap();
        assert_eq!(admission.queued(), 0);
        assert_eq!(admission.in_flight(), 0);
    }
}
