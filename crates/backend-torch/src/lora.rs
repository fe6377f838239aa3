//! LoRA adapters on libtorch tensors: each site's `Aᵀ` and `Bᵀ` on the device in the model's
//! kind, and the update of [`LlamaOps::lora`](infermux_core::model::LlamaOps::lora) in the
//! shape core's [`BatchLora`](infermux_core::model::BatchLora) gives: one adapter's matmul pair for a batch on one adapter, or
//! the batch's adapters stacked by [`LoraStack`](infermux_core::model::LoraStack) (one
//! matmul pair per site and a row mask) for a batch that mixes them; core's [`AdapterSet`]
//! keeps the adapters and the stack.

use infermux_core::ForwardBatch;
use infermux_core::model::{AdapterSet, LoraAdapter, LoraSite};
use tch::{Device, Kind, TchError, Tensor};

/// Per layer, per site: `(Aᵀ [inp, rank], Bᵀ [rank, out])`.
type Sites = Vec<[Option<(Tensor, Tensor)>; 4]>;

/// One adapter's matrices.
pub(crate) struct TorchLora {
    layers: Sites,
}

impl TorchLora {
    /// Uploads `adapter` to `device` as `kind`.
    pub fn upload(adapter: &LoraAdapter, device: Device, kind: Kind) -> Result<Self, TchError> {
        let _guard = tch::no_grad_guard();
        let mut layers = Vec::with_capacity(adapter.layers.len());
        for sites in &adapter.layers {
            let mut out: [Option<(Tensor, Tensor)>; 4] = Default::default();
            for (slot, update) in out.iter_mut().zip(sites) {
                if let Some(u) = update {
                    let matrix = |v: &[f32], rows: usize, cols: usize| {
                        Tensor::f_from_slice(v)?
                            .f_reshape([rows as i64, cols as i64])?
                            .f_t_copy()?
                            .f_to_kind(kind)?
                            .f_to_device(device)
                    };
                    *slot = Some((matrix(&u.a, u.rank, u.inp)?, matrix(&u.b, u.out, u.rank)?));
                }
            }
            layers.push(out);
        }
        Ok(Self { layers })
    }

    fn site(&self, layer: usize, site: LoraSite) -> Option<&(Tensor, Tensor)> {
        self.layers
            .get(layer)
            .and_then(|l| l[site.index()].as_ref())
    }
}

/// How `batch`'s rows take `adapters`' updates (stacking a mix's adapters on `device`).
pub(crate) fn rows<'a>(
    adapters: &'a mut AdapterSet<TorchLora>,
    batch: &ForwardBatch,
    device: Device,
    kind: Kind,
) -> Result<AdapterRows<'a>, TchError> {
    let Some(run) = adapters
        .for_batch(batch, |stack| TorchLora::upload(stack, device, kind))
        .map_err(|e| TchError::Kind(e.to_string()))?
    else {
        return Ok(AdapterRows::default());
    };
    let mask = match run.mask {
        Some((mask, width)) => Some(
            Tensor::f_from_slice(&mask)?
                .f_reshape([batch.num_tokens() as i64, width as i64])?
                .f_to_kind(kind)?
                .f_to_device(device)?,
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
    lora: Option<&'a TorchLora>,
    mask: Option<Tensor>,
}

impl AdapterRows<'_> {
    /// `y` plus each row's adapter update of `site` in `layer` on `x`.
    pub fn apply(
        &self,
        x: &Tensor,
        y: Tensor,
        layer: usize,
        site: LoraSite,
    ) -> Result<Tensor, TchError> {
        let Some((at, bt)) = self.lora.and_then(|l| l.site(layer, site)) else {
            return Ok(y);
        };
        let h = x.f_matmul(at)?;
        let h = match &self.mask {
            Some(mask) => h.f_mul(mask)?,
            None => h,
        };
        y.f_add(&h.f_matmul(bt)?)
    }
}
