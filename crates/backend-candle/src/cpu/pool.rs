//! A persistent thread pool for short data-parallel loops, where the caller never waits for a
//! worker that has not started.
//!
//! A job is a range of items claimed in grains from a shared cursor. The caller claims too;
//! workers that wake while the job is open join it. When the caller runs out of items it closes
//! the job and waits only for workers that joined (each finishes at most the grain it holds). On
//! a machine shared with other processes a descheduled worker therefore costs nothing, instead of
//! stalling every call until it is scheduled again. Idle workers spin briefly, then park.

use std::cell::UnsafeCell;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::Thread;

/// `state` bits: the job's generation (high), whether it is open, how many workers run it.
const OPEN: u64 = 1 << 32;
const ACTIVE: u64 = OPEN - 1;
const GEN_SHIFT: u32 = 33;

/// Spins of an idle worker before it parks: enough to bridge the serial gaps between the
/// parallel loops of one forward pass (microseconds), short enough not to burn a core that other
/// processes on a shared machine could use.
const SPINS: u32 = 4_000;

struct Job {
    /// Calls `f(range)` for a type-erased `&(dyn Fn(Range<usize>) + Sync)`.
    run: unsafe fn(*const (), Range<usize>),
    f: *const (),
    cursor: AtomicUsize,
    n: usize,
    grain: usize,
}

impl Job {
    /// Claims and runs grains until none are left.
    ///
    /// # Safety
    /// `f` must point to a live closure of the type `run` expects.
    unsafe fn drain(&self) {
        loop {
            let start = self.cursor.fetch_add(self.grain, Ordering::Relaxed);
            if start >= self.n {
                return;
            }
            // SAFETY: the caller keeps the closure alive while the job is open or joined.
            unsafe { (self.run)(self.f, start..self.n.min(start + self.grain)) };
        }
    }
}

struct Shared {
    state: AtomicU64,
    job: UnsafeCell<Job>,
    stop: AtomicBool,
    panicked: AtomicBool,
    sleepers: Vec<(AtomicBool, OnceLock<Thread>)>,
}

// SAFETY: `job` is written only by the caller holding `Pool::call` while no worker is joined
// (state closed, active 0), and read by workers only between a successful join and their leave.
unsafe impl Sync for Shared {}
// SAFETY: as above; the raw pointer in `Job` is only dereferenced under that protocol.
unsafe impl Send for Shared {}

pub(crate) struct Pool {
    shared: Arc<Shared>,
    call: Mutex<u64>,
}

impl Pool {
    fn new(workers: usize) -> Self {
        let shared = Arc::new(Shared {
            state: AtomicU64::new(0),
            job: UnsafeCell::new(Job {
                run: |_, _| {},
                f: std::ptr::null(),
                cursor: AtomicUsize::new(0),
                n: 0,
                grain: 1,
            }),
            stop: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            sleepers: (0..workers)
                .map(|_| (AtomicBool::new(false), OnceLock::new()))
                .collect(),
        });
        for id in 0..workers {
            let s = Arc::clone(&shared);
            let handle = std::thread::Builder::new()
                .name(format!("infermux-cpu-{id}"))
                .spawn(move || worker(&s, id))
                .expect("spawning a CPU worker thread");
            let _ = shared.sleepers[id].1.set(handle.thread().clone());
        }
        Self {
            shared,
            call: Mutex::new(0),
        }
    }

    /// Threads that take part in a job (the caller included).
    pub fn threads(&self) -> usize {
        self.shared.sleepers.len() + 1
    }

    /// Runs `f` over `0..n` in ranges of `grain` items, on the caller and any worker that joins.
    pub fn run<F: Fn(Range<usize>) + Sync>(&self, n: usize, grain: usize, f: F) {
        let grain = grain.max(1);
        if n == 0 {
            return;
        }
        if n <= grain || self.shared.sleepers.is_empty() {
            f(0..n);
            return;
        }
        unsafe fn call<F: Fn(Range<usize>)>(f: *const (), r: Range<usize>) {
            // SAFETY: `f` was made from a `&F` that outlives the job.
            unsafe { (*(f as *const F))(r) }
        }
        let mut generation = self.call.lock().unwrap_or_else(|e| e.into_inner());
        *generation = (*generation + 1) & ((1 << (64 - GEN_SHIFT)) - 1);
        let s = &*self.shared;
        // SAFETY: no worker is joined (the previous call waited for active == 0 after closing)
        // and no other caller runs (we hold `call`).
        unsafe {
            let job = &mut *s.job.get();
            job.run = call::<F>;
            job.f = &f as *const F as *const ();
            job.cursor.store(0, Ordering::Relaxed);
            job.n = n;
            job.grain = grain;
        }
        s.state
            .store((*generation << GEN_SHIFT) | OPEN, Ordering::Release);
        for (sleeping, thread) in &s.sleepers {
            if sleeping.load(Ordering::Acquire)
                && let Some(t) = thread.get()
            {
                t.unpark();
            }
        }
        // A panic in `f` here must still close the job and wait for joined workers.
        struct Close<'a>(&'a Shared);
        impl Drop for Close<'_> {
            fn drop(&mut self) {
                self.0.state.fetch_and(!OPEN, Ordering::AcqRel);
                while self.0.state.load(Ordering::Acquire) & ACTIVE != 0 {
                    std::hint::spin_loop();
                }
            }
        }
        let close = Close(s);
        // SAFETY: `f` is alive for this whole function.
        unsafe { (*s.job.get()).drain() };
        drop(close);
        if s.panicked.swap(false, Ordering::AcqRel) {
            panic!("a CPU worker thread panicked");
        }
    }
}

fn worker(s: &Shared, id: usize) {
    let mut seen = 0u64;
    loop {
        let mut spins = 0u32;
        let state = loop {
            let st = s.state.load(Ordering::Acquire);
            if st & OPEN != 0 && st >> GEN_SHIFT != seen {
                break st;
            }
            if s.stop.load(Ordering::Relaxed) {
                return;
            }
            spins += 1;
            if spins < SPINS {
                std::hint::spin_loop();
            } else {
                let sleeping = &s.sleepers[id].0;
                sleeping.store(true, Ordering::SeqCst);
                let st = s.state.load(Ordering::SeqCst);
                if !(st & OPEN != 0 && st >> GEN_SHIFT != seen) {
                    std::thread::park();
                }
                sleeping.store(false, Ordering::Release);
                spins = 0;
            }
        };
        seen = state >> GEN_SHIFT;
        // Join only the job we saw, and only while it is open.
        if s.state
            .compare_exchange(state, state + 1, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            // Closed, or someone else joined first: retry from the current state.
            let st = s.state.load(Ordering::Acquire);
            if st >> GEN_SHIFT == seen && st & OPEN != 0 {
                seen = 0_u64.wrapping_sub(1); // not joined yet: look again
            }
            continue;
        }
        // SAFETY: joined: the caller keeps the job and its closure alive until we leave.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe {
            (*s.job.get()).drain()
        }));
        if r.is_err() {
            s.panicked.store(true, Ordering::Release);
        }
        s.state.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for (_, t) in &self.shared.sleepers {
            if let Some(t) = t.get() {
                t.unpark();
            }
        }
    }
}

/// The process-wide pool: candle's thread count (`RAYON_NUM_THREADS`, else physical cores).
pub(crate) fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool::new(candle_core::utils::get_num_threads().max(1) - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_runs_once() {
        let pool = Pool::new(2);
        for n in [0, 1, 7, 100, 1000] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            for _ in 0..50 {
                pool.run(n, 3, |r| {
                    for i in r {
                        hits[i].fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 50));
        }
    }
}
