//! LoRA adapters on candle: each site's `A` and `B` as projections of the serving runtime
//! (packed for our CPU kernels, else tensors on the device), and the update of
//! [`LlamaOps::lora`](infermux_core::model::LlamaOps::lora) in the shape core's [`BatchLora`](infermux_core::model::BatchLora)
//! gives: one adapter for a batch on one adapter, or the batch's adapters stacked by
//! [`LoraStack`](infermux_core::model::LoraStack) (one projection pair per site and a row
//! mask) for a batch that mixes them; core's [`AdapterSet`] keeps the adapters and the stack.
//!
//! The projections run on the same kernels as the model's: on candle's own matmul a
//! `[32, 96] × [96, 3072]` LoRA product took 855 µs on this project's 2-core machine (the
//! whole update cost a third of the decode throughput). Our packed kernel is one fused
//! multiply-add chain per output, so the zeros of other adapters' columns add exactly nothing
//! and a row's result is bitwise the same in a mixed batch as alone.

use candle_core::Tensor;
use infermux_core::ForwardBatch;
use infermux_core::model::{AdapterSet, LoraAdapter, LoraSite};

use crate::ops::{CandleLinear, Runtime};

/// One adapter's projections: per layer, per site, `(A [rank, inp], B [out, rank])`.
pub(crate) struct CandleLora {
    layers: Vec<[Option<(CandleLinear, CandleLinear)>; 4]>,
}

impl CandleLora {
    /// Uploads `adapter` for `rt`.
    pub fn upload(adapter: &LoraAdapter, rt: &Runtime) -> candle_core::Result<Self> {
        let layers = adapter
            .layers
            .iter()
            .map(|sites| {
                let mut out: [Option<(CandleLinear, CandleLinear)>; 4] = Default::default();
                for (slot, update) in out.iter_mut().zip(sites) {
                    if let Some(u) = update {
                        *slot = Some((
                            CandleLinear::from_host(&u.a, u.rank, u.inp, rt)?,
                            CandleLinear::from_host(&u.b, u.out, u.rank, rt)?,
                        ));
                    }
                }
                Ok(out)
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self { layers })
    }
}

/// How `batch`'s rows take `adapters`' updates (stacking a mix's adapters for `rt`).
pub(crate) fn rows<'a>(
    adapters: &'a mut AdapterSet<CandleLora>,
    batch: &ForwardBatch,
    rt: &Runtime,
) -> candle_core::Result<AdapterRows<'a>> {
    let Some(run) = adapters
        .for_batch(batch, |stack| CandleLora::upload(stack, rt))
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?
    else {
        return Ok(AdapterRows::default());
    };
    let mask = match run.mask {
        Some((mask, width)) => Some(
            Tensor::from_vec(mask, (batch.num_tokens(), width), &rt.device)?.to_dtype(rt.dtype)?,
        ),
        None => None,
    };
    Ok(AdapterRows {
        lora: Some(run.lora),
        mask,
    })
}

/// How one batch's rows take their adapters' updates: the adapter (or stack) they run, and
/// for a stack each row's 0/1 mask of its columns (all zeros for a base row).
#[derive(Default)]
pub(crate) struct AdapterRows<'a> {
    lora: Option<&'a CandleLora>,
    pub mask: Option<Tensor>,
}

impl<'a> AdapterRows<'a> {
    /// The `(A, B)` projections of `site` in `layer`, if the batch's adapters update it.
    pub fn site(&self, layer: usize, site: LoraSite) -> Option<&'a (CandleLinear, CandleLinear)> {
        self.lora?.layers.get(layer)?[site.index()].as_ref()
    }
}
