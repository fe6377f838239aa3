//! Where the candle backend keeps KV state: the storage half of core's [`KvTable`]
//! (`infermux_core::kv`), which does all the bookkeeping.
//!
//! With the CPU kernels, a slot's layers live in host vectors that the attention op
//! ([`crate::cpu::Attention`]) writes and reads in place; otherwise they are candle tensors
//! written with `slice_set` and read through `narrow` views.

use candle_core::{DType, Device, Tensor};
use infermux_core::BackendError;
use infermux_core::kv::KvStorage;

use crate::device::runtime_error;

/// One slot's keys and values per layer, each `[kv_heads, capacity, head_dim]`.
pub(crate) enum SlotKv {
    /// Host vectors (CPU kernels).
    Host(Vec<crate::cpu::HostLayerKv>),
    /// Candle tensors on the backend's device.
    Tensors(Vec<(Tensor, Tensor)>),
}

/// Allocates slots of one layout.
pub(crate) struct KvStore {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// `None`: host vectors; otherwise tensors of this dtype on this device.
    pub tensors: Option<(DType, Device)>,
}

impl KvStorage for KvStore {
    type Slot = SlotKv;

    fn allocate(&mut self, capacity: usize) -> Result<SlotKv, BackendError> {
        let (nkv, hd) = (self.num_kv_heads, self.head_dim);
        Ok(match &self.tensors {
            None => SlotKv::Host(
                (0..self.num_layers)
                    .map(|_| {
                        (
                            vec![0f32; nkv * capacity * hd],
                            vec![0f32; nkv * capacity * hd],
                        )
                    })
                    .collect(),
            ),
            Some((dtype, device)) => {
                let alloc = || Tensor::zeros((nkv, capacity, hd), *dtype, device);
                let layers = (0..self.num_layers)
                    .map(|_| Ok((alloc()?, alloc()?)))
                    .collect::<candle_core::Result<Vec<_>>>()
                    .map_err(runtime_error)?;
                SlotKv::Tensors(layers)
            }
        })
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
        let (nkv, hd) = (self.num_kv_heads, self.head_dim);
        match (src, dst) {
            (SlotKv::Host(src), SlotKv::Host(dst)) => {
                for ((sk, sv), (dk, dv)) in src.iter().zip(dst.iter_mut()) {
                    let (scap, dcap) = (sk.len() / (nkv * hd), dk.len() / (nkv * hd));
                    for h in 0..nkv {
                        let (s, d) = (h * scap * hd, h * dcap * hd);
                        dk[d..d + len * hd].copy_from_slice(&sk[s..s + len * hd]);
                        dv[d..d + len * hd].copy_from_slice(&sv[s..s + len * hd]);
                    }
                }
                Ok(())
            }
            (SlotKv::Tensors(src), SlotKv::Tensors(dst)) => {
                let copy =
                    |s: &Tensor, d: &Tensor| d.slice_set(&s.narrow(1, 0, len)?.contiguous()?, 1, 0);
                for ((sk, sv), (dk, dv)) in src.iter().zip(dst.iter()) {
                    copy(sk, dk)
                        .and_then(|()| copy(sv, dv))
                        .map_err(runtime_error)?;
                }
                Ok(())
            }
            _ => Err(BackendError::Runtime {
                runtime: "candle",
                message: "KV slots of different kinds".into(),
            }),
        }
    }
}
