//! Per-slot key/value state kept in host memory, `[kv_heads][len * head_dim]` per layer, from
//! which each run's (left-padded) `past_key_values` are assembled.

use std::collections::HashMap;

use infermux_core::SlotId;

/// Shape facts every layer's cache shares.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KvShape {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// One layer of one sequence: keys and values, one buffer per kv head.
#[derive(Clone)]
struct LayerKv {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

#[derive(Clone)]
struct SlotKv {
    len: usize,
    layers: Vec<LayerKv>,
}

/// All sequences' caches, by slot.
pub(crate) struct KvCache {
    shape: KvShape,
    slots: HashMap<SlotId, SlotKv>,
}

impl KvCache {
    pub fn new(shape: KvShape) -> Self {
        Self {
            shape,
            slots: HashMap::new(),
        }
    }

    pub fn shape(&self) -> KvShape {
        self.shape
    }

    /// Tokens cached for `slot`.
    pub fn len(&self, slot: SlotId) -> usize {
        self.slots.get(&slot).map_or(0, |s| s.len)
    }

    pub fn release(&mut self, slot: SlotId) {
        self.slots.remove(&slot);
    }

    /// Makes `dst` an independent copy of `src`; `false` if `src` holds nothing.
    pub fn fork(&mut self, src: SlotId, dst: SlotId) -> bool {
        match self.slots.get(&src).cloned() {
            Some(s) => {
                self.slots.insert(dst, s);
                true
            }
            None => false,
        }
    }

    /// Writes `slot`'s layer `layer` keys (or values) into `out`, a `[kv_heads, padded_len,
    /// head_dim]` block, right-aligned: the first `padded_len - len` positions stay zero.
    pub fn write_past(
        &self,
        slot: SlotId,
        layer: usize,
        values: bool,
        padded_len: usize,
        out: &mut [f32],
    ) {
        let hd = self.shape.head_dim;
        let Some(s) = self.slots.get(&slot) else {
            return;
        };
        let l = &s.layers[layer];
        let heads = if values { &l.v } else { &l.k };
        let pad = padded_len - s.len;
        for (h, buf) in heads.iter().enumerate() {
            let start = (h * padded_len + pad) * hd;
            out[start..start + s.len * hd].copy_from_slice(buf);
        }
    }

    /// Appends `t` new positions from a `present` block (`[kv_heads, total, head_dim]`, the new
    /// positions last) to `slot`'s layer `layer`.
    pub fn append(
        &mut self,
        slot: SlotId,
        layer: usize,
        values: bool,
        present: &[f32],
        total: usize,
        t: usize,
    ) {
        let shape = self.shape;
        let s = self.slots.entry(slot).or_insert_with(|| SlotKv {
            len: 0,
            layers: vec![
                LayerKv {
                    k: vec![Vec::new(); shape.num_kv_heads],
                    v: vec![Vec::new(); shape.num_kv_heads]
                };
                shape.num_layers
            ],
        });
        let hd = shape.head_dim;
        let l = &mut s.layers[layer];
        let heads = if values { &mut l.v } else { &mut l.k };
        for (h, buf) in heads.iter_mut().enumerate() {
            let start = (h * total + total - t) * hd;
            buf.extend_from_slice(&present[start..start + t * hd]);
        }
    }

    /// Records that `t` tokens were appended to `slot` in every layer.
    pub fn advance(&mut self, slot: SlotId, t: usize) {
        if let Some(s) = self.slots.get_mut(&slot) {
            s.len += t;
        }
    }
}
