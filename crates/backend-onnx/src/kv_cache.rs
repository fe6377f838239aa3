//! Per-slot key/value state as views into the `present.*` tensors of the run that produced it.
//!
//! A run over slots `s0..sB` yields one [`KvBlock`]: the graph's `present.N.key/value` outputs,
//! `[B, kv_heads, total, head_dim]` each, left-padded, where ONNX Runtime allocated them (host
//! memory on CPU, device memory on CUDA). Each slot then holds a [`SlotKv`] view: the block, its
//! row, and its length (the last `len` positions of the row; the ones before are padding).
//!
//! Blocks are immutable once produced, so a fork is a clone of the view and a release drops it.
//! When the next run covers exactly the rows of one block (put in row order first by
//! [`KvCache::block_order`]), the block's tensors are bound as that run's `past_key_values.*` as
//! they are ([`KvCache::resident`]): no copy, no host round trip. Left padding stays valid: every
//! row grows by the same number of positions per run, and the mask keeps zeros over the pad.
//! Only when the composition changes is a new past assembled from the views, left-padded to the
//! longest ([`KvCache::assemble`]), reading device blocks through one host copy each; slots left
//! behind on a mostly unused block are then compacted ([`KvCache::store`]).

use std::collections::HashMap;
use std::sync::Arc;

use infermux_core::{BackendError, SlotId};
use ort::memory::AllocationDevice;
use ort::value::{DynTensor, PrimitiveTensorElementType, Tensor};

use crate::error::runtime_error;
use crate::io::KvType;

/// Shape facts every layer's cache shares.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KvShape {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// The KV output of one run: per layer, keys then values, each `[rows, kv_heads, total,
/// head_dim]`.
pub(crate) struct KvBlock {
    tensors: Vec<DynTensor>,
    rows: usize,
    total: usize,
}

impl KvBlock {
    /// Wraps `tensors` (`2 * num_layers`, keys and values interleaved by layer).
    pub fn new(tensors: Vec<DynTensor>, rows: usize, total: usize) -> Self {
        Self {
            tensors,
            rows,
            total,
        }
    }

    /// Positions per row, padding included.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Layer `layer`'s keys (`values == false`) or values.
    pub fn tensor(&self, layer: usize, values: bool) -> &DynTensor {
        &self.tensors[2 * layer + usize::from(values)]
    }

    /// Host-readable tensors: the block's own on the CPU, a copy of them otherwise.
    fn host_tensors(&self) -> Result<std::borrow::Cow<'_, [DynTensor]>, BackendError> {
        if self
            .tensors
            .iter()
            .all(|t| t.memory_info().is_cpu_accessible())
        {
            return Ok(std::borrow::Cow::Borrowed(&self.tensors));
        }
        let copies = self
            .tensors
            .iter()
            .map(|t| t.to(AllocationDevice::CPU, 0).map_err(runtime_error))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(std::borrow::Cow::Owned(copies))
    }
}

/// One sequence's state: the `len` positions of row `row` of `block` that end at `end` (the
/// block's `total` unless the view was cut to a prefix by [`KvCache::fork_prefix`]).
#[derive(Clone)]
struct SlotKv {
    block: Arc<KvBlock>,
    row: usize,
    len: usize,
    end: usize,
}

impl SlotKv {
    /// Whether the view reaches its block's last position (so the block can be a run's past).
    fn is_whole(&self) -> bool {
        self.end == self.block.total
    }
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

    /// Tokens cached for `slot`.
    pub fn len(&self, slot: SlotId) -> usize {
        self.slots.get(&slot).map_or(0, |s| s.len)
    }

    pub fn release(&mut self, slot: SlotId) {
        self.slots.remove(&slot);
    }

    /// Makes `dst` a view of the first `len` positions of `src` (shared: blocks are never
    /// written).
    pub fn fork_prefix(
        &mut self,
        src: SlotId,
        dst: SlotId,
        len: usize,
    ) -> Result<(), BackendError> {
        let mut view = self
            .slots
            .get(&src)
            .cloned()
            .ok_or(BackendError::UnknownSlot(src))?;
        if len > view.len {
            return Err(BackendError::Runtime {
                runtime: "onnx",
                message: format!("slot {src:?} caches {} positions, not {len}", view.len),
            });
        }
        view.end -= view.len - len;
        view.len = len;
        self.slots.insert(dst, view);
        Ok(())
    }

    /// The block whose rows are exactly `slots`, in order, if there is one: its tensors can be
    /// the next run's past as they are.
    pub fn resident(&self, slots: &[SlotId]) -> Option<Arc<KvBlock>> {
        let first = self.slots.get(slots.first()?)?;
        let block = &first.block;
        if block.rows != slots.len() {
            return None;
        }
        let all = slots.iter().enumerate().all(|(i, s)| {
            self.slots
                .get(s)
                .is_some_and(|v| v.row == i && v.is_whole() && Arc::ptr_eq(&v.block, block))
        });
        all.then(|| Arc::clone(block))
    }

    /// If `slots` are the rows of one block in some order, the order of `slots`' indices that
    /// puts them in row order (so that the run can take the block as its past).
    pub fn block_order(&self, slots: &[SlotId]) -> Option<Vec<usize>> {
        let block = &self.slots.get(slots.first()?)?.block;
        if block.rows != slots.len() {
            return None;
        }
        let mut order: Vec<Option<usize>> = vec![None; slots.len()];
        for (i, s) in slots.iter().enumerate() {
            let v = self.slots.get(s)?;
            if !Arc::ptr_eq(&v.block, block) || !v.is_whole() || order[v.row].replace(i).is_some() {
                return None;
            }
        }
        order.into_iter().collect()
    }

    /// Assembles `slots`' states as a past of `past` positions (`>=` every slot's length), left
    /// padded with zeros: `2 * num_layers` host tensors `[slots, kv_heads, past, head_dim]`.
    pub fn assemble(
        &self,
        ty: KvType,
        slots: &[SlotId],
        past: usize,
    ) -> Result<Vec<DynTensor>, BackendError> {
        match ty {
            KvType::F32 => self.assemble_as::<f32>(slots, past),
            KvType::F16 => self.assemble_as::<half::f16>(slots, past),
        }
    }

    fn assemble_as<T: PrimitiveTensorElementType + Copy + Default + std::fmt::Debug + 'static>(
        &self,
        slots: &[SlotId],
        past: usize,
    ) -> Result<Vec<DynTensor>, BackendError> {
        let KvShape {
            num_layers,
            num_kv_heads: nkv,
            head_dim: hd,
        } = self.shape;
        let b = slots.len();
        let views: Vec<Option<&SlotKv>> = slots.iter().map(|s| self.slots.get(s)).collect();
        // One host view of every distinct block (a copy only for device-resident blocks).
        let mut blocks: Vec<&Arc<KvBlock>> = Vec::new();
        for v in views.iter().flatten() {
            if !blocks.iter().any(|b| Arc::ptr_eq(b, &v.block)) {
                blocks.push(&v.block);
            }
        }
        let hosts = blocks
            .iter()
            .map(|b| b.host_tensors())
            .collect::<Result<Vec<_>, _>>()?;
        // Per view: its row's tensors (host-readable), by layer.
        let sources: Vec<Option<(&SlotKv, &[DynTensor])>> = views
            .iter()
            .map(|view| {
                view.map(|v| {
                    let at = blocks
                        .iter()
                        .position(|b| Arc::ptr_eq(b, &v.block))
                        .expect("every view's block was collected");
                    (v, &hosts[at][..])
                })
            })
            .collect();
        let mut out = Vec::with_capacity(2 * num_layers);
        for k in 0..2 * num_layers {
            let mut data = vec![T::default(); b * nkv * past * hd];
            for (i, source) in sources.iter().enumerate() {
                let Some((v, tensors)) = source else { continue };
                let src_total = v.block.total;
                let (_, src) = tensors[k]
                    .try_extract_tensor::<T>()
                    .map_err(runtime_error)?;
                for h in 0..nkv {
                    let from = ((v.row * nkv + h) * src_total + v.end - v.len) * hd;
                    let to = ((i * nkv + h) * past + past - v.len) * hd;
                    data[to..to + v.len * hd].copy_from_slice(&src[from..from + v.len * hd]);
                }
            }
            out.push(
                Tensor::from_array((vec![b, nkv, past, hd], data))
                    .map_err(runtime_error)?
                    .upcast(),
            );
        }
        Ok(out)
    }

    /// Records the run that produced `block`: `slots[i]` is now row `i`, `lens[i]` long.
    ///
    /// Slots outside the run that are left holding a mostly unused block (under half of its
    /// rows still referenced) are compacted into blocks of their own, so that a sequence that
    /// sits out does not pin a whole batch's cache.
    pub fn store(
        &mut self,
        ty: KvType,
        block: KvBlock,
        slots: &[SlotId],
        lens: &[usize],
    ) -> Result<(), BackendError> {
        let block = Arc::new(block);
        let mut previous: Vec<Arc<KvBlock>> = Vec::new();
        for (i, (&slot, &len)) in slots.iter().zip(lens).enumerate() {
            let view = SlotKv {
                end: block.total,
                block: Arc::clone(&block),
                row: i,
                len,
            };
            if let Some(old) = self.slots.insert(slot, view)
                && !Arc::ptr_eq(&old.block, &block)
                && !previous.iter().any(|p| Arc::ptr_eq(p, &old.block))
            {
                previous.push(old.block);
            }
        }
        for old in previous {
            let views = self
                .slots
                .values()
                .filter(|v| Arc::ptr_eq(&v.block, &old))
                .count();
            if views == 0 || 2 * views >= old.rows {
                continue;
            }
            let mut holders: Vec<((usize, usize, usize), SlotId)> = self
                .slots
                .iter()
                .filter(|(_, v)| Arc::ptr_eq(&v.block, &old))
                .map(|(&s, v)| ((v.row, v.end, v.len), s))
                .collect();
            holders.sort();
            // Forks share a view: one compact block per distinct view.
            let mut compact: Option<((usize, usize, usize), SlotKv)> = None;
            for (key, slot) in holders {
                let view = match &compact {
                    Some((k, view)) if *k == key => view.clone(),
                    _ => {
                        let len = self.len(slot);
                        let tensors = self.assemble(ty, &[slot], len)?;
                        let view = SlotKv {
                            block: Arc::new(KvBlock::new(tensors, 1, len)),
                            row: 0,
                            len,
                            end: len,
                        };
                        compact = Some((key, view.clone()));
                        view
                    }
                };
                self.slots.insert(slot, view);
            }
        }
        Ok(())
    }
}
