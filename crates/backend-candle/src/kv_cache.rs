//! Per-slot key/value buffers that grow by doubling and are appended in place.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use infermux_core::SlotId;

/// Shape facts every layer's cache shares.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KvShape {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// One layer's keys and values for one sequence: `[kv_heads, capacity, head_dim]` each.
struct LayerKv {
    k: Tensor,
    v: Tensor,
}

/// One sequence's cache across layers.
struct SlotKv {
    len: usize,
    capacity: usize,
    layers: Vec<LayerKv>,
}

/// All sequences' caches, by slot.
pub(crate) struct KvCache {
    shape: KvShape,
    dtype: DType,
    device: Device,
    slots: HashMap<SlotId, SlotKv>,
}

const MIN_CAPACITY: usize = 64;

impl KvCache {
    pub fn new(shape: KvShape, dtype: DType, device: Device) -> Self {
        Self {
            shape,
            dtype,
            device,
            slots: HashMap::new(),
        }
    }

    /// Tokens cached for `slot`.
    pub fn len(&self, slot: SlotId) -> usize {
        self.slots.get(&slot).map_or(0, |s| s.len)
    }

    pub fn release(&mut self, slot: SlotId) {
        self.slots.remove(&slot);
    }

    /// Makes `dst` an independent copy of `src`.
    pub fn fork(&mut self, src: SlotId, dst: SlotId) -> candle_core::Result<bool> {
        let Some(s) = self.slots.get(&src) else {
            return Ok(false);
        };
        let layers = s
            .layers
            .iter()
            .map(|l| {
                Ok(LayerKv {
                    k: l.k.copy()?,
                    v: l.v.copy()?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let copy = SlotKv {
            len: s.len,
            capacity: s.capacity,
            layers,
        };
        self.slots.insert(dst, copy);
        Ok(true)
    }

    /// Ensures `slot` exists and can hold `extra` more tokens (reallocating by doubling).
    pub fn reserve(&mut self, slot: SlotId, extra: usize) -> candle_core::Result<()> {
        let (shape, dtype, device) = (self.shape, self.dtype, self.device.clone());
        let alloc =
            |cap: usize| Tensor::zeros((shape.num_kv_heads, cap, shape.head_dim), dtype, &device);
        let entry = self.slots.entry(slot);
        let s = match entry {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(SlotKv {
                len: 0,
                capacity: 0,
                layers: Vec::new(),
            }),
        };
        let needed = s.len + extra;
        if needed <= s.capacity {
            return Ok(());
        }
        let capacity = needed.next_power_of_two().max(MIN_CAPACITY);
        let mut layers = Vec::with_capacity(shape.num_layers);
        for l in 0..shape.num_layers {
            let (k, v) = (alloc(capacity)?, alloc(capacity)?);
            if s.len > 0 {
                let old = &s.layers[l];
                k.slice_set(&old.k.narrow(1, 0, s.len)?.contiguous()?, 1, 0)?;
                v.slice_set(&old.v.narrow(1, 0, s.len)?.contiguous()?, 1, 0)?;
            }
            layers.push(LayerKv { k, v });
        }
        s.layers = layers;
        s.capacity = capacity;
        Ok(())
    }

    /// Writes `k`, `v` (`[kv_heads, t, head_dim]`) for `layer` at `start` and returns views of
    /// all `start + t` cached keys and values. Call [`KvCache::advance`] after the last layer.
    pub fn append(
        &mut self,
        slot: SlotId,
        layer: usize,
        start: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let s = self
            .slots
            .get_mut(&slot)
            .expect("reserve() creates the slot");
        let l = &s.layers[layer];
        let t = k.dim(1)?;
        l.k.slice_set(&k.contiguous()?, 1, start)?;
        l.v.slice_set(&v.contiguous()?, 1, start)?;
        Ok((l.k.narrow(1, 0, start + t)?, l.v.narrow(1, 0, start + t)?))
    }

    /// Records that `t` tokens were appended to `slot` in every layer.
    pub fn advance(&mut self, slot: SlotId, t: usize) {
        if let Some(s) = self.slots.get_mut(&slot) {
            s.len += t;
        }
    }
}
