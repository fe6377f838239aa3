//! Per-slot key/value buffers in host memory, `[kv_heads, capacity, head_dim]` per layer, grown by
//! doubling and written in place (the layout of [`crate::kv_cache`], without tensors).

use std::collections::HashMap;

use infermux_core::SlotId;

use crate::kv_cache::KvShape;

/// One sequence's cache: per layer, keys and values.
#[derive(Clone)]
pub(crate) struct HostSlot {
    pub len: usize,
    pub capacity: usize,
    /// Per layer, `(keys, values)`, each `[kv_heads, capacity, head_dim]`.
    pub layers: Vec<(Vec<f32>, Vec<f32>)>,
}

/// All sequences' host caches, by slot.
pub(crate) struct HostKv {
    pub shape: KvShape,
    pub slots: HashMap<SlotId, HostSlot>,
}

const MIN_CAPACITY: usize = 64;

impl HostKv {
    pub fn new(shape: KvShape) -> Self {
        Self {
            shape,
            slots: HashMap::new(),
        }
    }

    pub fn len(&self, slot: SlotId) -> usize {
        self.slots.get(&slot).map_or(0, |s| s.len)
    }

    pub fn release(&mut self, slot: SlotId) {
        self.slots.remove(&slot);
    }

    /// Makes `dst` an independent copy of `src`; false if `src` holds nothing.
    pub fn fork(&mut self, src: SlotId, dst: SlotId) -> bool {
        match self.slots.get(&src) {
            Some(s) => {
                let copy = s.clone();
                self.slots.insert(dst, copy);
                true
            }
            None => false,
        }
    }

    /// Ensures `slot` exists and can hold `extra` more tokens (reallocating by doubling).
    pub fn reserve(&mut self, slot: SlotId, extra: usize) {
        let shape = self.shape;
        let s = self.slots.entry(slot).or_insert_with(|| HostSlot {
            len: 0,
            capacity: 0,
            layers: Vec::new(),
        });
        let needed = s.len + extra;
        if needed <= s.capacity {
            return;
        }
        let capacity = needed.next_power_of_two().max(MIN_CAPACITY);
        let (nkv, hd) = (shape.num_kv_heads, shape.head_dim);
        let grow = |old: &[f32]| {
            let mut buf = vec![0f32; nkv * capacity * hd];
            for h in 0..nkv {
                let src = &old[h * s.capacity * hd..][..s.len * hd];
                buf[h * capacity * hd..][..s.len * hd].copy_from_slice(src);
            }
            buf
        };
        let layers = (0..shape.num_layers)
            .map(|l| match s.layers.get(l) {
                Some((k, v)) => (grow(k), grow(v)),
                None => (
                    vec![0f32; nkv * capacity * hd],
                    vec![0f32; nkv * capacity * hd],
                ),
            })
            .collect();
        s.layers = layers;
        s.capacity = capacity;
    }
}
