//! The prefix cache (vLLM's automatic prefix caching): the KV state of finished sequences stays
//! in their slots, and a later request whose tokens extend one of them forks that prefix
//! ([`Backend::fork_prefix`](crate::Backend::fork_prefix)) instead of prefilling it. Running
//! requests' prefilled prompts are donors too (the scheduler looks at those itself).
//!
//! Prefixes are matched in whole blocks of [`PREFIX_BLOCK`] tokens through chained hashes of
//! the token ids (block `i`'s hash covers every token before its end), then verified token by
//! token, so a hash collision can never serve another prompt's KV. A reused prefix leaves at
//! least the prompt's last token to run, whose logits the request samples from.
//!
//! A request that wants prompt logprobs reuses a prefix only as far as its donor knows the
//! logprob of every token in it (a donor's prompt logprobs when it asked for them, and the raw
//! logprob of every token it sampled — the same arithmetic as scoring, so reuse changes no
//! number); one that wants top-k prompt alternatives never reuses (they are not kept).
//!
//! Entries hold slots of the pool and bytes of the KV budget; the scheduler evicts the least
//! recently used when admission needs either, and flushes all of them before a weight update
//! (KV computed with the old weights is stale).

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use crate::TokenId;
use crate::backend::{AdapterId, SlotId};

/// Tokens per block: prefixes are matched and reused in whole blocks (vLLM's default size).
pub const PREFIX_BLOCK: usize = 16;

/// Chained hashes of the full blocks of `tokens` run on `adapter`: entry `i` stands for
/// `tokens[..(i + 1) * PREFIX_BLOCK]`. The chain starts from the adapter, so KV computed with
/// one adapter (or the base) never matches a request on another.
pub(crate) fn block_hashes(tokens: &[TokenId], adapter: Option<AdapterId>) -> Vec<u64> {
    let mut prev = adapter.map_or(0, |a| u64::from(a.0) + 1);
    tokens
        .chunks_exact(PREFIX_BLOCK)
        .map(|block| {
            let mut h = DefaultHasher::new();
            prev.hash(&mut h);
            block.hash(&mut h);
            prev = h.finish();
            prev
        })
        .collect()
}

/// A prefix a request could reuse: whose tokens (and, when known, per-position logprobs).
pub(crate) struct Donor<'a> {
    pub tokens: &'a [TokenId],
    pub hashes: &'a [u64],
    /// `logprobs[p]`: the raw logprob of `tokens[p]` given the tokens before it.
    pub logprobs: Option<&'a [Option<f32>]>,
}

/// What a request asks of a prefix it would reuse.
pub(crate) struct Wanted<'a> {
    pub tokens: &'a [TokenId],
    pub hashes: &'a [u64],
    /// The most tokens it may reuse (its prompt's length minus the one that must run).
    pub max_len: usize,
    /// It returns prompt logprobs: each reused position's must be known.
    pub needs_logprobs: bool,
}

impl Donor<'_> {
    /// Tokens of `want` this donor can serve: whole matching blocks, verified token by token,
    /// up to `want.max_len`, and only as far as its logprobs are known when they are needed.
    pub fn usable_len(&self, want: &Wanted<'_>) -> usize {
        let blocks = self
            .hashes
            .iter()
            .zip(want.hashes)
            .take(want.max_len / PREFIX_BLOCK)
            .take_while(|(a, b)| a == b)
            .count();
        let mut len = (blocks * PREFIX_BLOCK).min(self.tokens.len());
        len -= len % PREFIX_BLOCK;
        if self.tokens[..len] != want.tokens[..len] {
            // A hash collision: trust only the verified blocks.
            let same = self.tokens[..len]
                .iter()
                .zip(want.tokens)
                .take_while(|(a, b)| a == b)
                .count();
            len = same - same % PREFIX_BLOCK;
        }
        if want.needs_logprobs {
            let known = match self.logprobs {
                Some(lps) => 1 + lps.iter().skip(1).take_while(|l| l.is_some()).count(),
                None => 0,
            };
            len = len.min(known - known % PREFIX_BLOCK);
        }
        len
    }
}

/// One cached prefix: the tokens whose KV its slot holds.
struct Entry {
    adapter: Option<AdapterId>,
    tokens: Vec<TokenId>,
    hashes: Vec<u64>,
    logprobs: Vec<Option<f32>>,
    /// KV bytes the slot holds (its capacity).
    bytes: u64,
    last_used: u64,
}

impl Entry {
    fn donor(&self) -> Donor<'_> {
        Donor {
            tokens: &self.tokens,
            hashes: &self.hashes,
            logprobs: Some(&self.logprobs),
        }
    }
}

/// The finished prefixes kept, by the slot that holds each.
#[derive(Default)]
pub(crate) struct PrefixCache {
    entries: HashMap<SlotId, Entry>,
    /// First block's hash → the entries starting with it.
    by_first_block: HashMap<u64, Vec<SlotId>>,
    clock: u64,
    bytes: u64,
}

/// A cached prefix a request can reuse: the slot to fork and how many tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hit {
    pub slot: SlotId,
    pub len: usize,
}

impl PrefixCache {
    /// Cached prefixes.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// KV bytes the cached prefixes hold.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The longest cached prefix `want` can reuse (marked used), if any.
    pub fn lookup(&mut self, want: &Wanted<'_>) -> Option<Hit> {
        let first = want.hashes.first()?;
        let best = self
            .by_first_block
            .get(first)?
            .iter()
            .map(|slot| Hit {
                slot: *slot,
                len: self.entries[slot].donor().usable_len(want),
            })
            .max_by_key(|h| h.len)
            .filter(|h| h.len > 0)?;
        self.clock += 1;
        if let Some(e) = self.entries.get_mut(&best.slot) {
            e.last_used = self.clock;
        }
        Some(best)
    }

    /// The logprobs of the prefix `slot` holds.
    pub fn logprobs(&self, slot: SlotId) -> &[Option<f32>] {
        self.entries.get(&slot).map_or(&[], |e| &e.logprobs)
    }

    /// Keeps `slot`'s KV of `tokens` (`logprobs` per position, `bytes` of KV). Returns the slots
    /// to release: `slot` itself when a kept prefix already covers `tokens`, and the kept
    /// prefixes that `tokens` extend (they would never be the longest match again).
    pub fn insert(
        &mut self,
        slot: SlotId,
        tokens: Vec<TokenId>,
        logprobs: Vec<Option<f32>>,
        bytes: u64,
        adapter: Option<AdapterId>,
    ) -> Vec<SlotId> {
        let hashes = block_hashes(&tokens, adapter);
        let Some(&first) = hashes.first() else {
            return vec![slot];
        };
        let mut released = Vec::new();
        for other in self.by_first_block.get(&first).cloned().unwrap_or_default() {
            let e = &self.entries[&other];
            let (longer, shorter) = if e.tokens.len() >= tokens.len() {
                (&e.tokens, &tokens)
            } else {
                (&tokens, &e.tokens)
            };
            if e.adapter != adapter || !longer.starts_with(shorter) {
                continue;
            }
            if e.tokens.len() >= tokens.len() {
                self.clock += 1;
                if let Some(e) = self.entries.get_mut(&other) {
                    e.last_used = self.clock;
                }
                return vec![slot];
            }
            self.remove(other);
            released.push(other);
        }
        self.clock += 1;
        self.bytes += bytes;
        self.by_first_block.entry(first).or_default().push(slot);
        self.entries.insert(
            slot,
            Entry {
                adapter,
                tokens,
                hashes,
                logprobs,
                bytes,
                last_used: self.clock,
            },
        );
        released
    }

    /// Drops the least recently used prefix; returns its slot to release.
    pub fn evict_lru(&mut self) -> Option<SlotId> {
        let slot = *self.entries.iter().min_by_key(|(_, e)| e.last_used)?.0;
        self.remove(slot);
        Some(slot)
    }

    /// Drops every prefix; returns their slots to release.
    pub fn flush(&mut self) -> Vec<SlotId> {
        self.by_first_block.clear();
        self.bytes = 0;
        self.entries.drain().map(|(slot, _)| slot).collect()
    }

    /// Drops the prefixes computed with `adapter` (being unloaded); returns their slots.
    pub fn drop_adapter(&mut self, adapter: AdapterId) -> Vec<SlotId> {
        let slots: Vec<SlotId> = self
            .entries
            .iter()
            .filter(|(_, e)| e.adapter == Some(adapter))
            .map(|(s, _)| *s)
            .collect();
        slots.iter().for_each(|&s| self.remove(s));
        slots
    }

    fn remove(&mut self, slot: SlotId) {
        let Some(e) = self.entries.remove(&slot) else {
            return;
        };
        self.bytes -= e.bytes;
        if let Some(list) = self.by_first_block.get_mut(&e.hashes[0]) {
            list.retain(|s| *s != slot);
            if list.is_empty() {
                self.by_first_block.remove(&e.hashes[0]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize, salt: u32) -> Vec<TokenId> {
        (0..n as u32).map(|i| i * 7 + salt).collect()
    }

    fn want<'a>(tokens: &'a [TokenId], hashes: &'a [u64], needs_logprobs: bool) -> Wanted<'a> {
        Wanted {
            tokens,
            hashes,
            max_len: tokens.len() - 1,
            needs_logprobs,
        }
    }

    #[test]
    fn reuses_whole_blocks_and_leaves_the_last_token_to_run() {
        let mut cache = PrefixCache::default();
        let kept = ids(40, 1);
        assert!(
            cache
                .insert(SlotId(3), kept.clone(), vec![None; 40], 100, None)
                .is_empty()
        );
        // Shares 40 tokens then diverges: 2 whole blocks (32) reusable.
        let mut prompt = kept.clone();
        prompt.extend([9999, 9998]);
        let h = block_hashes(&prompt, None);
        let hit = cache.lookup(&want(&prompt, &h, false)).unwrap();
        assert_eq!(
            hit,
            Hit {
                slot: SlotId(3),
                len: 32
            }
        );
        // Exactly 32 tokens: at most 31 may be reused, so one block (16).
        let short = &kept[..32];
        let h = block_hashes(short, None);
        assert_eq!(cache.lookup(&want(short, &h, false)).unwrap().len, 16);
        // Another first block: no hit.
        let other = ids(40, 2);
        let h = block_hashes(&other, None);
        assert_eq!(cache.lookup(&want(&other, &h, false)), None);
    }

    #[test]
    fn prompt_logprobs_limit_reuse_to_known_positions() {
        let mut cache = PrefixCache::default();
        let kept = ids(64, 1);
        let mut lps = vec![Some(-1.0); 64];
        lps[0] = None;
        lps[20] = None;
        cache.insert(SlotId(0), kept.clone(), lps, 1, None);
        let mut prompt = kept.clone();
        prompt.push(5);
        let h = block_hashes(&prompt, None);
        assert_eq!(cache.lookup(&want(&prompt, &h, false)).unwrap().len, 64);
        // Positions 1..20 known: one block.
        assert_eq!(cache.lookup(&want(&prompt, &h, true)).unwrap().len, 16);
    }

    #[test]
    fn a_longer_prefix_replaces_the_one_it_extends_and_lru_evicts_oldest() {
        let mut cache = PrefixCache::default();
        let base = ids(32, 1);
        cache.insert(SlotId(1), base[..16].to_vec(), vec![None; 16], 10, None);
        // Extends slot 1's prefix: slot 1 is released.
        assert_eq!(
            cache.insert(SlotId(2), base.clone(), vec![None; 32], 20, None),
            vec![SlotId(1)]
        );
        // Covered by slot 2's: the new slot itself is released.
        assert_eq!(
            cache.insert(SlotId(4), base[..20].to_vec(), vec![None; 20], 20, None),
            vec![SlotId(4)]
        );
        cache.insert(SlotId(5), ids(32, 3), vec![None; 32], 30, None);
        assert_eq!((cache.len(), cache.bytes()), (2, 50));
        let h = block_hashes(&ids(33, 3), None);
        cache.lookup(&want(&ids(33, 3), &h, false)).unwrap();
        assert_eq!(cache.evict_lru(), Some(SlotId(2)));
        assert_eq!(cache.flush(), vec![SlotId(5)]);
        assert_eq!((cache.len(), cache.bytes()), (0, 0));
    }

    #[test]
    fn a_hash_collision_never_serves_other_tokens() {
        let kept = ids(32, 1);
        let mut prompt = kept.clone();
        prompt[20] = 12345;
        prompt.push(1);
        // Pretend the chained hashes collide.
        let hashes = block_hashes(&kept, None);
        let donor = Donor {
            tokens: &kept,
            hashes: &hashes,
            logprobs: None,
        };
        let w = Wanted {
            tokens: &prompt,
            hashes: &hashes,
            max_len: 32,
            needs_logprobs: false,
        };
        assert_eq!(donor.usable_len(&w), 16);
    }
}
