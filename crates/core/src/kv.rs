//! KV slot bookkeeping, once for every backend: each slot's cached length and capacity, growth,
//! fork, truncate, release, and a byte budget that no allocation passes.
//!
//! A backend supplies the storage ([`KvStorage`]: allocate a slot's layer tensors for a number of
//! positions, copy a prefix from one slot to another) and reads and writes those tensors in its
//! attention op; the [`KvTable`] decides when and how much to allocate.
//!
//! Capacity grows in multiples of [`KV_GRANULE`] positions: a slot never holds more than
//! `KV_GRANULE - 1` unused positions, so the engine can admit work against the budget with
//! [`kv_capacity_for`] and know no slot allocates past what it reserved. Growth copies the filled
//! prefix; amortized over a long sequence this is a small fraction of the attention reads.

use std::collections::HashMap;

use crate::backend::SlotId;
use crate::error::BackendError;

/// Positions by which a slot's capacity grows.
pub const KV_GRANULE: usize = 64;

/// The capacity a slot holding `tokens` positions has: `tokens` rounded up to [`KV_GRANULE`].
pub fn kv_capacity_for(tokens: usize) -> usize {
    tokens.div_ceil(KV_GRANULE).saturating_mul(KV_GRANULE)
}

/// A backend's KV memory: one slot's layer tensors, allocated and copied on request.
pub trait KvStorage {
    /// One sequence's keys and values across layers, `capacity` positions each.
    type Slot;

    /// New (uninitialised or zeroed) storage for `capacity` positions.
    fn allocate(&mut self, capacity: usize) -> Result<Self::Slot, BackendError>;

    /// Copies positions `0..len` of every layer of `src` into `dst`.
    fn copy_prefix(
        &mut self,
        src: &Self::Slot,
        dst: &mut Self::Slot,
        len: usize,
    ) -> Result<(), BackendError>;
}

/// One slot: how much it holds, how much it can hold, and its storage.
#[derive(Debug)]
pub struct KvSlot<S> {
    /// Positions cached.
    pub len: usize,
    /// Positions allocated.
    pub capacity: usize,
    /// The backend's tensors.
    pub storage: S,
}

/// Bytes in use and the limit, for metrics and admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KvUsage {
    /// Bytes allocated to slots.
    pub allocated_bytes: u64,
    /// The budget (`None`: unlimited).
    pub budget_bytes: Option<u64>,
    /// Bytes of one cached position across all layers (keys and values).
    pub bytes_per_token: u64,
}

/// Every slot's KV state, by [`SlotId`].
#[derive(Debug)]
pub struct KvTable<S> {
    slots: HashMap<SlotId, KvSlot<S>>,
    bytes_per_token: u64,
    budget_bytes: Option<u64>,
    allocated_positions: u64,
}

impl<S> KvTable<S> {
    /// An empty table whose positions cost `bytes_per_token` each.
    pub fn new(bytes_per_token: u64) -> Self {
        Self {
            slots: HashMap::new(),
            bytes_per_token,
            budget_bytes: None,
            allocated_positions: 0,
        }
    }

    /// Limits the bytes all slots may allocate together (`None`: no limit).
    pub fn set_budget(&mut self, bytes: Option<u64>) {
        self.budget_bytes = bytes;
    }

    /// Allocation and budget.
    pub fn usage(&self) -> KvUsage {
        KvUsage {
            allocated_bytes: self.allocated_positions * self.bytes_per_token,
            budget_bytes: self.budget_bytes,
            bytes_per_token: self.bytes_per_token,
        }
    }

    /// Positions cached in `slot` (0 when it holds nothing).
    pub fn len(&self, slot: SlotId) -> usize {
        self.slots.get(&slot).map_or(0, |s| s.len)
    }

    /// The slot's state, if it holds any.
    pub fn get(&self, slot: SlotId) -> Option<&KvSlot<S>> {
        self.slots.get(&slot)
    }

    /// The slot's state, mutably (to write new positions into its storage).
    pub fn get_mut(&mut self, slot: SlotId) -> Option<&mut KvSlot<S>> {
        self.slots.get_mut(&slot)
    }

    /// The states of `ids` (distinct slots, each holding state), in that order: one exclusive
    /// borrow per slot, for a forward pass that writes several slots at once.
    pub fn get_many_mut(&mut self, ids: &[SlotId]) -> Result<Vec<&mut KvSlot<S>>, BackendError> {
        let index: HashMap<SlotId, usize> = ids.iter().enumerate().map(|(i, &s)| (s, i)).collect();
        if index.len() != ids.len() {
            return Err(BackendError::Runtime {
                runtime: "kv",
                message: "a batch addresses the same slot twice".into(),
            });
        }
        let mut found: Vec<Option<&mut KvSlot<S>>> = ids.iter().map(|_| None).collect();
        for (id, slot) in self.slots.iter_mut() {
            if let Some(&i) = index.get(id) {
                found[i] = Some(slot);
            }
        }
        found
            .into_iter()
            .zip(ids)
            .map(|(s, &id)| s.ok_or(BackendError::UnknownSlot(id)))
            .collect()
    }

    /// Slots holding state.
    pub fn num_slots(&self) -> usize {
        self.slots.len()
    }

    fn check_budget(&self, extra_positions: u64, slot: SlotId) -> Result<(), BackendError> {
        let Some(budget) = self.budget_bytes else {
            return Ok(());
        };
        let needed = (self.allocated_positions + extra_positions) * self.bytes_per_token;
        if needed > budget {
            return Err(BackendError::KvBudgetExceeded {
                slot,
                needed_bytes: needed,
                budget_bytes: budget,
            });
        }
        Ok(())
    }

    /// Makes room in `slot` (creating it) for `extra` more positions. Existing positions are
    /// copied into the larger storage.
    pub fn reserve<K: KvStorage<Slot = S>>(
        &mut self,
        store: &mut K,
        slot: SlotId,
        extra: usize,
    ) -> Result<(), BackendError> {
        let (len, capacity) = self
            .slots
            .get(&slot)
            .map_or((0, 0), |s| (s.len, s.capacity));
        let needed = len + extra;
        if needed <= capacity && self.slots.contains_key(&slot) {
            return Ok(());
        }
        let new_capacity = kv_capacity_for(needed).max(KV_GRANULE);
        // The old storage stays alive during the copy: count both against the budget.
        self.check_budget(new_capacity as u64, slot)?;
        let mut storage = store.allocate(new_capacity)?;
        if let Some(old) = self.slots.remove(&slot) {
            let copied = store.copy_prefix(&old.storage, &mut storage, old.len);
            self.allocated_positions -= old.capacity as u64;
            copied?;
        }
        self.allocated_positions += new_capacity as u64;
        self.slots.insert(
            slot,
            KvSlot {
                len,
                capacity: new_capacity,
                storage,
            },
        );
        Ok(())
    }

    /// Records that `t` positions were written to `slot` (after the forward pass wrote them).
    pub fn advance(&mut self, slot: SlotId, t: usize) {
        if let Some(s) = self.slots.get_mut(&slot) {
            debug_assert!(
                s.len + t <= s.capacity,
                "advance past the reserved capacity"
            );
            s.len = (s.len + t).min(s.capacity);
        }
    }

    /// Makes `dst` an independent copy of `src`, allocating and copying only the filled prefix.
    /// `dst`'s previous state is dropped first.
    pub fn fork<K: KvStorage<Slot = S>>(
        &mut self,
        store: &mut K,
        src: SlotId,
        dst: SlotId,
    ) -> Result<(), BackendError> {
        let len = self.len(src);
        self.fork_prefix(store, src, dst, len)
    }

    /// Makes `dst` an independent copy of the first `len` positions of `src` (at most its
    /// filled length), allocating for and copying only those. `dst`'s previous state is
    /// dropped first.
    pub fn fork_prefix<K: KvStorage<Slot = S>>(
        &mut self,
        store: &mut K,
        src: SlotId,
        dst: SlotId,
        len: usize,
    ) -> Result<(), BackendError> {
        let filled = self
            .slots
            .get(&src)
            .ok_or(BackendError::UnknownSlot(src))?
            .len;
        if len > filled {
            return Err(BackendError::Runtime {
                runtime: "kv",
                message: format!("slot {src:?} caches {filled} positions, not {len}"),
            });
        }
        if src == dst {
            self.truncate(src, len);
            return Ok(());
        }
        self.release(dst);
        let capacity = kv_capacity_for(len).max(KV_GRANULE);
        self.check_budget(capacity as u64, dst)?;
        let mut storage = store.allocate(capacity)?;
        store.copy_prefix(&self.slots[&src].storage, &mut storage, len)?;
        self.allocated_positions += capacity as u64;
        self.slots.insert(
            dst,
            KvSlot {
                len,
                capacity,
                storage,
            },
        );
        Ok(())
    }

    /// Drops positions `len..` of `slot` (the storage keeps its capacity).
    pub fn truncate(&mut self, slot: SlotId, len: usize) {
        if let Some(s) = self.slots.get_mut(&slot) {
            s.len = s.len.min(len);
        }
    }

    /// Frees `slot`; releasing an empty slot is a no-op.
    pub fn release(&mut self, slot: SlotId) {
        if let Some(s) = self.slots.remove(&slot) {
            self.allocated_positions -= s.capacity as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Storage as plain vectors of one value per position; counts allocations.
    #[derive(Default)]
    struct VecStore {
        allocations: Vec<usize>,
    }

    impl KvStorage for VecStore {
        type Slot = Vec<u32>;
        fn allocate(&mut self, capacity: usize) -> Result<Vec<u32>, BackendError> {
            self.allocations.push(capacity);
            Ok(vec![0; capacity])
        }
        fn copy_prefix(
            &mut self,
            src: &Vec<u32>,
            dst: &mut Vec<u32>,
            len: usize,
        ) -> Result<(), BackendError> {
            dst[..len].copy_from_slice(&src[..len]);
            Ok(())
        }
    }

    fn write(table: &mut KvTable<Vec<u32>>, store: &mut VecStore, slot: SlotId, vals: &[u32]) {
        table.reserve(store, slot, vals.len()).unwrap();
        let s = table.get_mut(slot).unwrap();
        let start = s.len;
        s.storage[start..start + vals.len()].copy_from_slice(vals);
        table.advance(slot, vals.len());
    }

    #[test]
    fn grows_in_granules_keeping_the_prefix() {
        let (mut t, mut store) = (KvTable::new(10), VecStore::default());
        let a = SlotId(0);
        let vals: Vec<u32> = (1..=70).collect();
        write(&mut t, &mut store, a, &vals[..5]);
        assert_eq!(t.get(a).unwrap().capacity, 64);
        write(&mut t, &mut store, a, &vals[5..]);
        let s = t.get(a).unwrap();
        assert_eq!((s.len, s.capacity), (70, 128));
        assert_eq!(&s.storage[..70], &vals[..]);
        assert_eq!(t.usage().allocated_bytes, 128 * 10);
        t.release(a);
        assert_eq!(t.usage().allocated_bytes, 0);
        assert_eq!(t.len(a), 0);
    }

    #[test]
    fn fork_copies_only_the_filled_prefix() {
        let (mut t, mut store) = (KvTable::new(1), VecStore::default());
        let vals: Vec<u32> = (1..=100).collect();
        write(&mut t, &mut store, SlotId(0), &vals);
        t.truncate(SlotId(0), 30);
        t.fork(&mut store, SlotId(0), SlotId(1)).unwrap();
        let f = t.get(SlotId(1)).unwrap();
        assert_eq!((f.len, f.capacity), (30, 64));
        assert_eq!(&f.storage[..30], &vals[..30]);
        assert!(matches!(
            t.fork(&mut store, SlotId(7), SlotId(2)),
            Err(BackendError::UnknownSlot(SlotId(7)))
        ));
    }

    #[test]
    fn nothing_allocates_past_the_budget() {
        let (mut t, mut store) = (KvTable::new(100), VecStore::default());
        t.set_budget(Some(100 * 128));
        t.reserve(&mut store, SlotId(0), 64).unwrap();
        t.reserve(&mut store, SlotId(1), 10).unwrap();
        let err = t.reserve(&mut store, SlotId(2), 1).unwrap_err();
        assert!(
            matches!(
                err,
                BackendError::KvBudgetExceeded {
                    budget_bytes: 12800,
                    ..
                }
            ),
            "{err}"
        );
        // Growing slot 1 would need its old and new storage at once: refused, state kept.
        assert!(t.reserve(&mut store, SlotId(1), 100).is_err());
        assert_eq!(t.get(SlotId(1)).unwrap().capacity, 64);
        t.release(SlotId(0));
        t.reserve(&mut store, SlotId(2), 1).unwrap();
        assert!(t.usage().allocated_bytes <= 12800);
    }
}
