//! LoRA adapters on candle tensors: each site's `Aᵀ` and `Bᵀ` on the device in the serving
//! dtype, and the update of [`LlamaOps::lora`](infermux_core::model::LlamaOps::lora): the rows
//! of each adapter in the batch gathered, `(x Aᵀ) Bᵀ` added back in place (one matmul pair per
//! adapter and site, so a batch mixing adapters costs a few small matmuls, not a forward each).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use infermux_core::AdapterId;
use infermux_core::model::{LoraAdapter, LoraSite};

/// One adapter's matrices: per layer, per site, `(Aᵀ [inp, rank], Bᵀ [rank, out])`.
pub(crate) struct CandleLora {
    layers: Vec<[Option<(Tensor, Tensor)>; 4]>,
}

impl CandleLora {
    /// Uploads `adapter` to `device` in `dtype`.
    pub fn upload(
        adapter: &LoraAdapter,
        device: &Device,
        dtype: DType,
    ) -> candle_core::Result<Self> {
        let mut layers = Vec::with_capacity(adapter.layers.len());
        for sites in &adapter.layers {
            let mut out: [Option<(Tensor, Tensor)>; 4] = Default::default();
            for (slot, update) in out.iter_mut().zip(sites) {
                if let Some(u) = update {
                    let a = Tensor::from_slice(&u.a, (u.rank, u.inp), device)?;
                    let b = Tensor::from_slice(&u.b, (u.out, u.rank), device)?;
                    *slot = Some((
                        a.t()?.contiguous()?.to_dtype(dtype)?,
                        b.t()?.contiguous()?.to_dtype(dtype)?,
                    ));
                }
            }
            layers.push(out);
        }
        Ok(Self { layers })
    }
}

/// A batch's rows per adapter, as index tensors (`all`: the adapter runs every row).
pub(crate) struct AdapterRows {
    groups: Vec<(AdapterId, Tensor, bool)>,
}

impl AdapterRows {
    /// The rows of `batch`'s adapters on `device`.
    pub fn new(batch: &infermux_core::ForwardBatch, device: &Device) -> candle_core::Result<Self> {
        let total = batch.num_tokens();
        let groups = batch
            .adapter_rows()
            .into_iter()
            .map(|(id, rows)| {
                let all = rows.len() == total;
                let n = rows.len();
                Ok((id, Tensor::from_vec(rows, n, device)?, all))
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self { groups })
    }

    /// `y` plus each adapter's update of `site` in `layer` on its rows of `x`.
    pub fn apply(
        &self,
        adapters: &HashMap<AdapterId, CandleLora>,
        x: &Tensor,
        mut y: Tensor,
        layer: usize,
        site: LoraSite,
    ) -> candle_core::Result<Tensor> {
        for (id, rows, all) in &self.groups {
            let Some(lora) = adapters.get(id) else {
                candle_core::bail!("no LoRA adapter {id:?} is loaded");
            };
            let Some((at, bt)) = lora
                .layers
                .get(layer)
                .and_then(|l| l[site.index()].as_ref())
            else {
                continue;
            };
            if *all {
                let delta = x.matmul(at)?.matmul(bt)?;
                y = (y + delta)?;
            } else {
                let delta = x.index_select(rows, 0)?.matmul(at)?.matmul(bt)?;
                y = y.index_add(rows, &delta, 0)?;
            }
        }
        Ok(y)
    }
}
