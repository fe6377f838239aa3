//! Per-slot key/value buffers that grow by doubling and are appended in place.

use std::collections::HashMap;

use infermux_core::SlotId;
use tch::{Device, Kind, Tensor};

/// Shape facts every layer's cache shares.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KvShape {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// One layer's keys and values for one sequence: `[1, kv_heads, capacity, head_dim]` each.
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
    kind: Kind,
    device: Device,
    slots: HashMap<SlotId, SlotKv>,
}

const MIN_CAPACITY: usize = 64;

impl KvCache {
    pub fn new(shape: KvShape, kind: Kind, device: Device) -> Self {
        Self {
            shape,
            kind,
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

    /// Makes `dst` an independent copy of `src`; `false` if `src` holds nothing.
    pub fn fork(&mut self, src: SlotId, dst: SlotId) -> Result<bool, tch::TchError> {
        let Some(s) = self.slots.get(&src) else {
            return Ok(false);
        };
        let layers = s
            .layers
            .iter()
            .map(|l| {
                Ok(LayerKv {
                    k: deep_copy(&l.k)?,
                    v: deep_copy(&l.v)?,
                })
            })
            .collect::<Result<Vec<_>, tch::TchError>>()?;
        let copy = SlotKv {
            len: s.len,
            capacity: s.capacity,
            layers,
        };
        self.slots.insert(dst, copy);
        Ok(true)
    }

    /// Ensures `slot` exists and can hold `extra` more tokens (reallocating by doubling).
    pub fn reserve(&mut self, slot: SlotId, extra: usize) -> Result<(), tch::TchError> {
        let (shape, kind, device) = (self.shape, self.kind, self.device);
        let s = self.slots.entry(slot).or_insert_with(|| SlotKv {
            len: 0,
            capacity: 0,
            layers: Vec::new(),
        });
        let needed = s.len + extra;
        if needed <= s.capacity {
            return Ok(());
        }
        let capacity = needed.next_power_of_two().max(MIN_CAPACITY);
        let dims = [
            1,
            shape.num_kv_heads as i64,
            capacity as i64,
            shape.head_dim as i64,
        ];
        let mut layers = Vec::with_capacity(shape.num_layers);
        for l in 0..shape.num_layers {
            let k = Tensor::f_zeros(dims, (kind, device))?;
            let v = Tensor::f_zeros(dims, (kind, device))?;
            if s.len > 0 {
                let old = &s.layers[l];
                k.f_narrow(2, 0, s.len as i64)?
                    .f_copy_(&old.k.f_narrow(2, 0, s.len as i64)?)?;
                v.f_narrow(2, 0, s.len as i64)?
                    .f_copy_(&old.v.f_narrow(2, 0, s.len as i64)?)?;
            }
            layers.push(LayerKv { k, v });
        }
        s.layers = layers;
        s.capacity = capacity;
        Ok(())
    }

    /// Writes `k`, `v` (`[1, kv_heads, t, head_dim]`) for `layer` at `start` and returns views
    /// of all `start + t` cached keys and values. Call [`KvCache::advance`] after the last layer.
    pub fn append(
        &mut self,
        slot: SlotId,
        layer: usize,
        start: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor), tch::TchError> {
        let s = self
            .slots
            .get_mut(&slot)
            .expect("reserve() creates the slot");
        let l = &s.layers[layer];
        let t = k.size()[2];
        l.k.f_narrow(2, start as i64, t)?.f_copy_(k)?;
        l.v.f_narrow(2, start as i64, t)?.f_copy_(v)?;
        let total = start as i64 + t;
        Ok((l.k.f_narrow(2, 0, total)?, l.v.f_narrow(2, 0, total)?))
    }

    /// Records that `t` tokens were appended to `slot` in every layer.
    pub fn advance(&mut self, slot: SlotId, t: usize) {
        if let Some(s) = self.slots.get_mut(&slot) {
            s.len += t;
        }
    }
}

/// A new tensor with its own storage holding `t`'s values.
fn deep_copy(t: &Tensor) -> Result<Tensor, tch::TchError> {
    let mut out = t.f_empty_like()?;
    out.f_copy_(t)?;
    Ok(out)
}
