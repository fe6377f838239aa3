//! The KV byte budget: its default (a share of the memory available when the engine starts),
//! what each request reserves against it while it holds its slots, and the admission rule.
//!
//! A slot's KV capacity grows in granules up to [`kv_capacity_for`] of its final length, so a
//! sequence that may reach `prompt + max_tokens` positions never allocates more than that. The
//! scheduler admits a request only when every admitted request's reservation fits in the budget,
//! with room for one growth copy (a slot's old storage stays alive while its prefix is copied
//! into the larger one), so no backend allocation that goes through [`crate::kv::KvTable`] can
//! fail for lack of budget.
//!
//! # Admission: FIFO with a bounded bypass
//!
//! Requests are admitted in submission order. The head of the queue starts as soon as its
//! slots are free and its reservation fits. While the head is blocked (not enough free slots
//! or KV budget), a later request that fits *now* may start ahead of it, in queue order, if its
//! worst-case run ([`worst_case_steps`]: its prompt's prefill chunks at the full token budget,
//! plus `max_tokens` decode steps) ends within what is left of the head's bypass window of
//! [`FAIR_BYPASS_WINDOW_STEPS`] steps, counted from the step the head first found itself
//! blocked. Once the window is spent, nothing passes the head until it starts.
//!
//! So a small request is not stuck behind a big one that waits for running work to drain
//! (strict FIFO, as vLLM's and TGI's waiting queues do, makes it wait for all of it), and the
//! big one is not starved: whatever passed it finishes (short of stop-early prefill sharing
//! the token budget) within the window, so the head starts at most
//! [`FAIR_BYPASS_WINDOW_STEPS`] steps later than it would have under strict FIFO.
//!
use crate::backend::ModelInfo;
use crate::engine::job::Job;
use crate::error::ValidationError;
use crate::kv::{KV_GRANULE, kv_capacity_for};

/// Share of `MemAvailable` the KV cache gets when no budget is configured: leaves room for the
/// weights (already loaded when the engine starts, so not in `MemAvailable`), activations, the
/// tokenizer and the rest of the process and machine.
pub const DEFAULT_KV_MEMORY_PERCENT: u64 = 40;

/// The default budget when `/proc/meminfo` cannot be read (not Linux, or sandboxed): 4 GiB.
pub const FALLBACK_KV_BUDGET_BYTES: u64 = 4 << 30;

/// The default KV budget: [`DEFAULT_KV_MEMORY_PERCENT`] of `MemAvailable` in `/proc/meminfo`
/// now, or [`FALLBACK_KV_BUDGET_BYTES`] when that cannot be read.
///
/// It is host memory: on a CUDA device, give the budget explicitly
/// (`EngineConfig::kv_budget_bytes`).
pub fn default_kv_budget_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .as_deref()
        .and_then(parse_mem_available)
        .map_or(FALLBACK_KV_BUDGET_BYTES, kv_share_of)
}

/// [`DEFAULT_KV_MEMORY_PERCENT`] of `available` bytes (at least one byte).
pub fn kv_share_of(available: u64) -> u64 {
    (available / 100)
        .saturating_mul(DEFAULT_KV_MEMORY_PERCENT)
        .max(1)
}

/// `MemAvailable` in bytes from the text of `/proc/meminfo` (`MemAvailable:  123456 kB`).
/// `None` when the line is missing or malformed.
pub fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?;
    let mut words = line.split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    let unit = match words.next() {
        None | Some("B") => 1,
        Some(u) if u.eq_ignore_ascii_case("kb") => 1024,
        Some(u) if u.eq_ignore_ascii_case("mb") => 1024 * 1024,
        Some(_) => return None,
    };
    value.checked_mul(unit)
}

/// Steps a blocked head of the queue lets later requests pass it (see the module docs): about
/// a few seconds of decoding on a CPU, a fraction of a long request's run.
pub const FAIR_BYPASS_WINDOW_STEPS: usize = 128;

/// The most scheduling steps `job` can run once admitted, if it gets the whole token budget
/// (`max_num_batched_tokens`) for its prefill: its prompt's chunks plus one step per token.
pub(crate) fn worst_case_steps(job: &Job, max_num_batched_tokens: usize) -> usize {
    job.prompt
        .len()
        .div_ceil(max_num_batched_tokens.max(1))
        .saturating_add(job.max_new_tokens)
}

/// What one request holds against the KV budget while it holds its slots: each of its
/// sequences (samples, beam slots, or the one scored prompt) may reach `positions` positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct KvReservation {
    /// Slots the request holds.
    pub slots: usize,
    /// Capacity each slot may grow to: its final length rounded up to the KV granule.
    pub positions: usize,
    /// Bytes of one cached position (the model's `kv_bytes_per_token`).
    pub bytes_per_token: u64,
}

impl KvReservation {
    /// The reservation of `job` on a model with `info`: every slot may hold
    /// `min(prompt + max_new_tokens, max_context)` positions.
    pub fn of(job: &Job, info: &ModelInfo) -> Self {
        let len = job
            .prompt
            .len()
            .saturating_add(job.max_new_tokens)
            .min(info.max_context);
        Self {
            slots: job.slots_needed(),
            positions: kv_capacity_for(len),
            bytes_per_token: info.kv_bytes_per_token,
        }
    }

    /// Bytes of one slot at its full capacity.
    fn slot_bytes(&self) -> u64 {
        (self.positions as u64).saturating_mul(self.bytes_per_token)
    }

    /// Bytes of all the request's slots at their full capacity.
    pub fn bytes(&self) -> u64 {
        self.slot_bytes().saturating_mul(self.slots as u64)
    }

    /// Extra bytes while one of the request's slots grows: the old storage stays alive while
    /// its prefix is copied into the larger one, and the old capacity is at most one granule
    /// short of the full one. Slots grow one at a time, so the budget needs room for the largest
    /// such copy among running requests, not one per request.
    pub fn growth_headroom_bytes(&self) -> u64 {
        if self.slots == 0 {
            return 0;
        }
        let old = self.positions.saturating_sub(KV_GRANULE) as u64;
        old.saturating_mul(self.bytes_per_token)
    }

    /// Bytes the request needs with nothing else running: more than the budget and it can never
    /// be admitted.
    pub fn alone_bytes(&self) -> u64 {
        self.bytes().saturating_add(self.growth_headroom_bytes())
    }

    /// The submit-time check: a request that can never fit the budget is an error now, not a
    /// wait forever.
    pub fn check_fits(&self, budget_bytes: u64) -> Result<(), ValidationError> {
        let needed_bytes = self.alone_bytes();
        if needed_bytes > budget_bytes {
            return Err(ValidationError::KvBudgetExceeded {
                needed_bytes,
                budget_bytes,
                sequences: self.slots,
                positions: self.positions,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_available_is_parsed_in_bytes() {
        let meminfo = "MemTotal:       24525512 kB\nMemFree:        20000000 kB\n\
                       MemAvailable:   23068672 kB\nBuffers:          123456 kB\n";
        assert_eq!(parse_mem_available(meminfo), Some(23_068_672 * 1024));
        assert_eq!(parse_mem_available("MemAvailable: 2048"), Some(2048));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: lots kB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: 1 parsecs\n"), None);
        assert_eq!(
            parse_mem_available("MemAvailable: 99999999999999999999 kB"),
            None
        );
        assert_eq!(kv_share_of(1000), 400);
        assert_eq!(kv_share_of(0), 1);
        let default = default_kv_budget_bytes();
        assert!(default > 0);
        if let Some(available) = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .as_deref()
            .and_then(parse_mem_available)
        {
            assert!(default <= available);
        } else {
            assert_eq!(default, FALLBACK_KV_BUDGET_BYTES);
        }
    }

    #[test]
    fn reservations_count_every_slot_at_its_rounded_capacity() {
        let r = KvReservation {
            slots: 3,
            positions: kv_capacity_for(65),
            bytes_per_token: 10,
        };
        assert_eq!(r.positions, 128);
        assert_eq!(r.bytes(), 3 * 128 * 10);
        assert_eq!(r.growth_headroom_bytes(), 64 * 10);
        assert_eq!(r.alone_bytes(), 3 * 1280 + 640);
        assert!(r.check_fits(r.alone_bytes()).is_ok());
        assert_eq!(
            r.check_fits(r.alone_bytes() - 1),
            Err(ValidationError::KvBudgetExceeded {
                needed_bytes: 4480,
                budget_bytes: 4479,
                sequences: 3,
                positions: 128,
            })
        );
        let none = KvReservation { slots: 0, ..r };
        assert_eq!(none.alone_bytes(), 0);
    }
}
