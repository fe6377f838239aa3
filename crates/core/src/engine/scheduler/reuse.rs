//! The scheduler's reuse of KV: the prefix cache (attaching hits and running donors to new
//! groups, keeping finished prefixes, eviction and flush) and the LoRA adapters whose KV it
//! keys.

use super::*;

impl Scheduler {
    /// Returns a cached prefix's slot to the pool.
    pub(super) fn release_cached(&mut self, backend: &mut dyn Backend, slot: SlotId) {
        backend.release(slot);
        self.free_slots.push(slot);
    }

    /// Drops every cached prefix (before a weight update, or on request); returns how many.
    pub(in crate::engine) fn flush_prefix_cache(&mut self, backend: &mut dyn Backend) -> usize {
        let slots = self.prefix_cache.flush();
        for &slot in &slots {
            self.release_cached(backend, slot);
        }
        slots.len()
    }

    /// Gives each newly admitted group the longest prefix it can reuse: a cached one, or the
    /// prefilled prompt of a running request, forked into its first slot so its prefill starts
    /// after it. A group whose prompt shares more blocks with one still being prefilled waits
    /// for that prefill instead (GRPO groups and multi-turn rollouts arrive together).
    pub(super) fn attach_prefixes(&mut self, backend: &mut dyn Backend) {
        for gi in 0..self.running.len() {
            let g = &self.running[gi];
            if g.ended || g.prefix == PrefixState::Done {
                continue;
            }
            let want = Wanted {
                tokens: &g.job.prompt,
                hashes: &g.prompt_hashes,
                max_len: g.job.prompt.len() - 1,
                needs_logprobs: g.job.prompt_logprobs.include,
            };
            let cached = self.prefix_cache.lookup(&want);
            let mut best = cached.map_or((None, 0), |h| (Some(Source::Cache(h.slot)), h.len));
            let mut lead = 0;
            for (yi, y) in self.running.iter().enumerate() {
                if yi == gi || y.ended || y.prefix == PrefixState::Waiting {
                    continue;
                }
                let logprobs = y.prompt_lp.as_deref();
                let full = Donor {
                    tokens: &y.job.prompt,
                    hashes: &y.prompt_hashes,
                    logprobs: logprobs.filter(|_| y.job.prompt_logprobs.include),
                };
                let shared = full.usable_len(&want);
                let ready = shared.min(y.prefilled - y.prefilled % PREFIX_BLOCK);
                if ready > best.1 {
                    best = (Some(Source::Running(yi)), ready);
                }
                // Still to be prefilled by `y` (ahead of this group in its first step).
                if y.prefilled < y.job.prompt.len() && (y.prefilled > 0 || yi < gi) {
                    lead = lead.max(shared);
                }
            }
            let gl = &mut self.running[gi];
            if lead > best.1 {
                gl.prefix = PrefixState::Waiting;
                continue;
            }
            gl.prefix = PrefixState::Done;
            self.totals.prefix_queried_tokens += gl.job.prompt.len() as u64;
            let (Some(source), len) = best else { continue };
            let (src, logprobs) = match source {
                Source::Cache(slot) => (slot, self.prefix_cache.logprobs(slot)),
                Source::Running(yi) => {
                    let y = &self.running[yi];
                    (y.slots[0], y.prompt_lp.as_deref().unwrap_or(&[]))
                }
            };
            // The logprob of the first token prefilled comes from the row before it, which a
            // reused position never yields: with prompt logprobs, the block's last position is
            // run again, and the donor's logprob of the token there (the same token, known) is
            // taken.
            let needs_logprobs = self.running[gi].job.prompt_logprobs.include;
            let reuse = if needs_logprobs { len - 1 } else { len };
            let logprobs = logprobs.get(..len).map(<[_]>::to_vec);
            let dst = self.running[gi].slots[0];
            if backend.fork_prefix(src, dst, reuse).is_err() {
                // Not reused (e.g. no KV memory for the copy now): prefill it all.
                backend.release(dst);
                continue;
            }
            let g = &mut self.running[gi];
            g.prefilled = reuse;
            g.cached_prompt_tokens = reuse;
            if let (Some(lp), Some(known)) = (&mut g.prompt_lp, logprobs) {
                lp[..len].copy_from_slice(&known);
            }
            self.totals.prefix_hit_tokens += reuse as u64;
            // vLLM counts a request's prompt tokens whether computed or taken from the cache.
            self.totals.prompt_tokens += reuse as u64;
        }
    }

    /// Loads `adapter` under `name` (`adapters.rs`).
    pub(in crate::engine) fn load_adapter(
        &mut self,
        backend: &mut dyn Backend,
        name: String,
        adapter: &crate::model::lora::LoraAdapter,
    ) -> Result<AdapterInfo, crate::model::lora::AdapterError> {
        self.adapters.load(backend, name, adapter)
    }

    /// Takes adapter `name` out of service and drops its cached prefixes.
    pub(in crate::engine) fn unload_adapter(
        &mut self,
        backend: &mut dyn Backend,
        name: &str,
    ) -> Result<AdapterInfo, crate::model::lora::AdapterError> {
        let running = &self.running;
        let info = self.adapters.unload(backend, name, |id| {
            running.iter().any(|g| g.adapter() == Some(id))
        })?;
        for slot in self.prefix_cache.drop_adapter(info.id) {
            self.release_cached(backend, slot);
        }
        Ok(info)
    }
}

/// A finished slot's prefix to keep: the slot, its tokens and their logprobs.
pub(super) type KeptPrefix = (SlotId, Vec<TokenId>, Vec<Option<f32>>);

impl Group {
    /// The adapter the group runs on.
    pub(super) fn adapter(&self) -> Option<AdapterId> {
        self.job.adapter.as_ref().map(|a| a.id)
    }
}

impl Scheduler {
    /// The prefixes of a finished group worth keeping: each sequence's slot (prompt and the
    /// tokens it generated, as far as its KV holds them), or the prompt of a scored one. Beam
    /// searches keep none (their seats are reshuffled), failed requests neither.
    pub(super) fn prefixes_to_keep(&self, g: &Group, backend: &dyn Backend) -> Vec<KeptPrefix> {
        if !self.config.prefix_caching || g.ended || matches!(g.job.kind, JobKind::Beam(_)) {
            return Vec::new();
        }
        let prompt = &g.job.prompt;
        let prompt_lps = || {
            g.prompt_lp
                .clone()
                .unwrap_or_else(|| vec![None; prompt.len()])
        };
        let keep = |slot: SlotId, generated: &[TokenId], lps: &[f32]| {
            let filled = backend.cached_len(slot);
            if filled < PREFIX_BLOCK || filled > prompt.len() + generated.len() {
                return None;
            }
            let mut tokens = prompt.clone();
            tokens.extend_from_slice(generated);
            tokens.truncate(filled);
            let mut logprobs = prompt_lps();
            logprobs.extend(lps.iter().map(|&l| Some(l)));
            logprobs.truncate(filled);
            Some((slot, tokens, logprobs))
        };
        if g.seqs.is_empty() {
            return g
                .slots
                .first()
                .and_then(|&s| keep(s, &[], &[]))
                .into_iter()
                .collect();
        }
        g.seqs
            .iter()
            .filter_map(|s| keep(s.slot, &s.out.tokens, &s.out.logprobs))
            .collect()
    }

    /// Puts finished prefixes in the cache, releasing the ones it does not need, then evicts
    /// the least recently used while the cache and the running requests exceed the budget.
    pub(super) fn keep_prefixes(
        &mut self,
        backend: &mut dyn Backend,
        kept: Vec<KeptPrefix>,
        adapter: Option<AdapterId>,
    ) {
        for (slot, tokens, logprobs) in kept {
            let bytes = (kv_capacity_for(tokens.len()).max(KV_GRANULE) as u64)
                .saturating_mul(self.info.kv_bytes_per_token);
            for released in self
                .prefix_cache
                .insert(slot, tokens, logprobs, bytes, adapter)
            {
                self.release_cached(backend, released);
            }
        }
        while self.kv_held().saturating_add(self.prefix_cache.bytes()) > self.kv_budget {
            let Some(slot) = self.prefix_cache.evict_lru() else {
                break;
            };
            self.release_cached(backend, slot);
        }
    }
}
