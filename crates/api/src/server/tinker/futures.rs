//! Tinker's futures: `asample` registers one and returns its id at once, `retrieve_future`
//! long-polls it. Bounded: results not yet delivered count against a cap (429 past it), a
//! delivered result is kept a short grace (the SDK may re-poll after a lost reply), an
//! undelivered one expires after a while. `(sampling_session_id, seq_id)` names a future too,
//! so a resent `asample` gets the existing one back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::AbortHandle;

/// How long a delivered result stays retrievable.
const DELIVERED_GRACE: Duration = Duration::from_secs(30);
/// Most delivered results kept for that grace (oldest dropped first).
const MAX_DELIVERED: usize = 1024;
/// How long a finished result nobody retrieved is kept.
const RESULT_TTL: Duration = Duration::from_secs(600);

/// What a future resolves to.
#[derive(Debug)]
pub(super) enum Outcome {
    /// A `SampleResponse` message (protobuf).
    Sample(Vec<u8>),
    /// A request that failed: Tinker's `RequestFailedResponse`.
    Failed {
        error: String,
        /// `user` (the request's fault) or `server`.
        category: &'static str,
    },
}

type Slot = Option<Arc<Outcome>>;

#[derive(Debug)]
struct Entry {
    key: Option<(String, u64)>,
    sequence_ids: Vec<String>,
    rx: watch::Receiver<Slot>,
    done_at: Option<Instant>,
    delivered_at: Option<Instant>,
    /// Resolved to a failure: kept only [`DELIVERED_GRACE`] and never counted against the
    /// cap, so bad requests nobody polls cannot lock other clients out.
    failed: bool,
    abort: Option<AbortHandle>,
}

#[derive(Debug, Default)]
struct Table {
    entries: HashMap<String, Entry>,
    keys: HashMap<(String, u64), String>,
    next: u64,
}

impl Table {
    fn remove(&mut self, id: &str) -> Option<Entry> {
        let e = self.entries.remove(id)?;
        if let Some(key) = &e.key {
            self.keys.remove(key);
        }
        Some(e)
    }

    /// Drops expired results; returns how many futures are not yet delivered.
    fn sweep(&mut self, now: Instant) -> usize {
        let mut expired = Vec::new();
        let mut delivered = Vec::new();
        for (id, e) in &self.entries {
            match (e.done_at, e.delivered_at) {
                (_, Some(at)) if now - at >= DELIVERED_GRACE => expired.push(id.clone()),
                (_, Some(at)) => delivered.push((at, id.clone())),
                (Some(at), None) if e.failed && now - at >= DELIVERED_GRACE => {
                    expired.push(id.clone())
                }
                (Some(at), None) if now - at >= RESULT_TTL => expired.push(id.clone()),
                _ => {}
            }
        }
        if delivered.len() > MAX_DELIVERED {
            delivered.sort();
            let excess = delivered.len() - MAX_DELIVERED;
            expired.extend(delivered.into_iter().take(excess).map(|(_, id)| id));
        }
        for id in expired {
            self.remove(&id);
        }
        self.entries
            .values()
            .filter(|e| e.delivered_at.is_none() && !e.failed)
            .count()
    }
}

/// A future's id and its samples' ids (`sample_sequence_ids`).
#[derive(Debug, Clone)]
pub(super) struct Registered {
    pub(super) request_id: String,
    pub(super) sequence_ids: Vec<String>,
}

/// Why a future was not registered.
#[derive(Debug)]
pub(super) enum Refused {
    /// The same `(sampling_session_id, seq_id)` has one already.
    Existing(Registered),
    /// Too many futures not yet delivered.
    Full,
}

/// Resolves one future. Dropped without [`Completer::complete`] (a panicking or cancelled
/// task), it fails the future with a server error, so no poller waits forever.
#[derive(Debug)]
pub(super) struct Completer {
    futures: Arc<Futures>,
    id: String,
    tx: Option<watch::Sender<Slot>>,
}

impl Completer {
    pub(super) fn id(&self) -> &str {
        &self.id
    }

    pub(super) fn complete(mut self, outcome: Outcome) {
        self.send(outcome);
    }

    fn send(&mut self, outcome: Outcome) {
        if let Some(tx) = self.tx.take() {
            let failed = matches!(outcome, Outcome::Failed { .. });
            let _ = tx.send(Some(Arc::new(outcome)));
            if let Some(e) = self.futures.lock().entries.get_mut(&self.id) {
                e.done_at = Some(Instant::now());
                e.failed = failed;
            }
        }
    }
}

impl Drop for Completer {
    fn drop(&mut self) {
        self.send(Outcome::Failed {
            error: "the sampling task ended without a result".into(),
            category: "server",
        });
    }
}

/// The server's futures.
#[derive(Debug, Default)]
pub(super) struct Futures {
    table: Mutex<Table>,
}

impl Futures {
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The future already registered under `key`, if any.
    pub(super) fn existing(&self, key: &(String, u64)) -> Option<Registered> {
        let t = self.lock();
        let id = t.keys.get(key)?;
        t.entries.get(id).map(|e| Registered {
            request_id: id.clone(),
            sequence_ids: e.sequence_ids.clone(),
        })
    }

    /// Whether fewer than `cap` futures are undelivered (after dropping expired results).
    pub(super) fn has_room(&self, cap: usize) -> bool {
        self.lock().sweep(Instant::now()) < cap
    }

    /// Registers a future of `samples` samples under `key`, unless `key` has one or `cap`
    /// undelivered futures exist.
    pub(super) fn register(
        self: &Arc<Self>,
        key: Option<(String, u64)>,
        samples: usize,
        cap: usize,
    ) -> Result<(Registered, Completer), Refused> {
        let mut t = self.lock();
        if let Some(key) = &key
            && let Some(id) = t.keys.get(key)
            && let Some(e) = t.entries.get(id)
        {
            return Err(Refused::Existing(Registered {
                request_id: id.clone(),
                sequence_ids: e.sequence_ids.clone(),
            }));
        }
        if t.sweep(Instant::now()) >= cap {
            return Err(Refused::Full);
        }
        t.next += 1;
        let request_id = match &key {
            Some((session, seq)) => format!("{session}:{seq}:{}", t.next),
            None => super::super::convert::request_id("tinker-sample") + &format!("-{}", t.next),
        };
        let sequence_ids: Vec<String> = (0..samples).map(|i| format!("{request_id}/{i}")).collect();
        let (tx, rx) = watch::channel(None);
        if let Some(key) = &key {
            t.keys.insert(key.clone(), request_id.clone());
        }
        t.entries.insert(
            request_id.clone(),
            Entry {
                key,
                sequence_ids: sequence_ids.clone(),
                rx,
                done_at: None,
                delivered_at: None,
                failed: false,
                abort: None,
            },
        );
        let registered = Registered {
            request_id: request_id.clone(),
            sequence_ids,
        };
        let completer = Completer {
            futures: self.clone(),
            id: request_id,
            tx: Some(tx),
        };
        Ok((registered, completer))
    }

    /// Remembers the task computing `id`, for [`Futures::cancel`].
    pub(super) fn set_task(&self, id: &str, abort: AbortHandle) {
        if let Some(e) = self.lock().entries.get_mut(id) {
            e.abort = Some(abort);
        }
    }

    /// Waits up to `hold` for `id`'s outcome: `None` for an unknown (or expired) id,
    /// `Some(None)` when it is still running.
    pub(super) async fn wait(&self, id: &str, hold: Duration) -> Option<Slot> {
        let mut rx = self.lock().entries.get(id)?.rx.clone();
        let waited = tokio::time::timeout(hold, rx.wait_for(Option::is_some))
            .await
            .map(|r| r.map(|v| v.clone()));
        let outcome = match waited {
            Ok(Ok(v)) => v,
            // The sender is gone only after sending (see `Completer`): read what it left.
            Ok(Err(_)) => rx.borrow().clone(),
            Err(_) => None,
        };
        if outcome.is_some()
            && let Some(e) = self.lock().entries.get_mut(id)
        {
            e.delivered_at.get_or_insert_with(Instant::now);
        }
        Some(outcome)
    }

    /// Forgets `id` and stops its work (dropping the engine future cancels the request);
    /// false for an unknown id.
    pub(super) fn cancel(&self, id: &str) -> bool {
        let entry = self.lock().remove(id);
        entry
            .inspect(|e| {
                if let Some(a) = &e.abort {
                    a.abort();
                }
            })
            .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seq: u64) -> Option<(String, u64)> {
        Some(("s:sample:0".into(), seq))
    }

    #[test]
    fn failed_futures_do_not_hold_places() {
        let f = Arc::new(Futures::default());
        let (_a, done_a) = f.register(key(0), 1, 1).unwrap();
        assert!(matches!(f.register(key(1), 1, 1), Err(Refused::Full)));
        done_a.complete(Outcome::Failed {
            error: "bad temperature".into(),
            category: "user",
        });
        assert!(
            f.register(key(1), 1, 1).is_ok(),
            "a failure nobody polled holds no place"
        );
    }

    #[tokio::test]
    async fn a_resent_key_gets_the_same_future_and_the_cap_counts_undelivered_ones() {
        let f = Arc::new(Futures::default());
        let (a, done_a) = f.register(key(0), 2, 2).unwrap();
        assert_eq!(
            a.sequence_ids,
            [format!("{}/0", a.request_id), format!("{}/1", a.request_id)]
        );
        match f.register(key(0), 2, 2) {
            Err(Refused::Existing(r)) => assert_eq!(r.request_id, a.request_id),
            other => panic!("{other:?}"),
        }
        let (_b, done_b) = f.register(key(1), 1, 2).unwrap();
        assert!(matches!(f.register(key(2), 1, 2), Err(Refused::Full)));
        assert!(matches!(
            f.wait(&a.request_id, Duration::from_millis(10)).await,
            Some(None)
        ));
        done_a.complete(Outcome::Sample(vec![1, 2]));
        let got = f
            .wait(&a.request_id, Duration::from_secs(5))
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(&*got, Outcome::Sample(b) if b == &[1, 2]));
        // Delivered: no longer counted, still retrievable during the grace.
        assert!(f.register(key(2), 1, 2).is_ok());
        assert!(
            f.wait(&a.request_id, Duration::ZERO)
                .await
                .unwrap()
                .is_some()
        );
        // A task that ends without a result fails its future instead of hanging its poller.
        let b_id = done_b.id().to_string();
        drop(done_b);
        let got = f
            .wait(&b_id, Duration::from_secs(5))
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(
            &*got,
            Outcome::Failed {
                category: "server",
                ..
            }
        ));
        assert!(f.cancel(&a.request_id));
        assert!(f.wait(&a.request_id, Duration::ZERO).await.is_none());
        assert!(
            f.existing(&key(0).unwrap()).is_none(),
            "cancel forgets the key too"
        );
    }
}
