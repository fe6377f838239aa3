//! KV storage in libtorch tensors; the slot bookkeeping (lengths, growth, fork, budget) is the
//! core's [`infermux_core::KvTable`], which calls [`TorchKvStore`] to allocate and copy.

use infermux_core::{BackendError, KvStorage};
use tch::{Device, Kind, TchError, Tensor};

use crate::device::runtime_error;

/// One layer's keys and values for one sequence: `[1, kv_heads, capacity, head_dim]` each, the
/// layout SDPA reads, so a slot's cached positions are a view (`narrow` on dim 2), not a copy.
pub(crate) struct LayerKv {
    k: Tensor,
    v: Tensor,
}

impl LayerKv {
    /// Writes `k` and `v` (`[1, kv_heads, t, head_dim]`) at positions `start..start + t` and
    /// returns views of positions `0..start + t` of both.
    pub fn append(
        &self,
        start: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor), TchError> {
        let (start, t) = (start as i64, k.size()[2]);
        self.k.f_narrow(2, start, t)?.f_copy_(k)?;
        self.v.f_narrow(2, start, t)?.f_copy_(v)?;
        Ok((
            self.k.f_narrow(2, 0, start + t)?,
            self.v.f_narrow(2, 0, start + t)?,
        ))
    }
}

/// One sequence's keys and values, by layer.
pub(crate) struct SlotKv {
    /// One entry per decoder layer.
    pub layers: Vec<LayerKv>,
}

/// Allocates and copies [`SlotKv`]s of one model on one device, in the model's kind.
pub(crate) struct TorchKvStore {
    num_layers: usize,
    num_kv_heads: i64,
    head_dim: i64,
    kind: Kind,
    device: Device,
}

impl TorchKvStore {
    /// Storage for a model with `num_layers` layers of `num_kv_heads` heads `head_dim` wide.
    pub fn new(
        num_layers: usize,
        num_kv_heads: usize,
        head_dim: usize,
        kind: Kind,
        device: Device,
    ) -> Self {
        Self {
            num_layers,
            num_kv_heads: num_kv_heads as i64,
            head_dim: head_dim as i64,
            kind,
            device,
        }
    }
}

impl KvStorage for TorchKvStore {
    type Slot = SlotKv;

    /// Uninitialised tensors: attention reads only the positions written (`0..len`), so zeroing
    /// would be a wasted pass over the memory.
    fn allocate(&mut self, capacity: usize) -> Result<SlotKv, BackendError> {
        let dims = [1, self.num_kv_heads, capacity as i64, self.head_dim];
        let options = (self.kind, self.device);
        let layers = (0..self.num_layers)
            .map(|_| {
                Ok(LayerKv {
                    k: Tensor::f_empty(dims, options)?,
                    v: Tensor::f_empty(dims, options)?,
                })
            })
            .collect::<Result<_, TchError>>()
            .map_err(runtime_error)?;
        Ok(SlotKv { layers })
    }

    fn copy_prefix(
        &mut self,
        src: &SlotKv,
        dst: &mut SlotKv,
        len: usize,
    ) -> Result<(), BackendError> {
        if len == 0 {
            return Ok(());
        }
        let len = len as i64;
        let copy = |from: &Tensor, to: &Tensor| -> Result<(), TchError> {
            to.f_narrow(2, 0, len)?.f_copy_(&from.f_narrow(2, 0, len)?)
        };
        for (s, d) in src.layers.iter().zip(&dst.layers) {
            copy(&s.k, &d.k).map_err(runtime_error)?;
            copy(&s.v, &d.v).map_err(runtime_error)?;
        }
        Ok(())
    }
}
