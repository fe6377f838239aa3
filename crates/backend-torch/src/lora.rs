//! LoRA adapters on libtorch tensors: each site's `Aᵀ` and `Bᵀ` on the device in the model's
//! kind, and the update of [`LlamaOps::lora`](infermux_core::model::LlamaOps::lora): each
//! adapter's rows of the batch gathered, `(x Aᵀ) Bᵀ` added back with `index_add` (one matmul
//! pair per adapter and site, whatever the mix of adapters in the batch).

use std::collections::HashMap;

use infermux_core::model::{LoraAdapter, LoraSite};
use infermux_core::{AdapterId, ForwardBatch};
use tch::{Device, Kind, TchError, Tensor};

/// One adapter's matrices: per layer, per site, `(Aᵀ [inp, rank], Bᵀ [rank, out])`.
pub(crate) struct TorchLora {
    layers: Vec<[Option<(Tensor, Tensor)>; 4]>,
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
}

/// A batch's rows per adapter, as index tensors (`all`: the adapter runs every row).
pub(crate) struct AdapterRows {
    groups: Vec<(AdapterId, Tensor, bool)>,
}

impl AdapterRows {
    /// The rows of `batch`'s adapters on `device`.
    pub fn new(batch: &ForwardBatch, device: Device) -> Result<Self, TchError> {
        let total = batch.num_tokens();
        let groups = batch
            .adapter_rows()
            .into_iter()
            .map(|(id, rows)| {
                let all = rows.len() == total;
                let rows: Vec<i64> = rows.into_iter().map(i64::from).collect();
                Ok((id, Tensor::f_from_slice(&rows)?.f_to_device(device)?, all))
            })
            .collect::<Result<_, TchError>>()?;
        Ok(Self { groups })
    }

    /// `y` plus each adapter's update of `site` in `layer` on its rows of `x`.
    pub fn apply(
        &self,
        adapters: &HashMap<AdapterId, TorchLora>,
        x: &Tensor,
        mut y: Tensor,
        layer: usize,
        site: LoraSite,
    ) -> Result<Tensor, TchError> {
        for (id, rows, all) in &self.groups {
            let Some(lora) = adapters.get(id) else {
                return Err(TchError::Kind(format!("no LoRA adapter {id:?} is loaded")));
            };
            let Some((at, bt)) = lora
                .layers
                .get(layer)
                .and_then(|l| l[site.index()].as_ref())
            else {
                continue;
            };
            if *all {
                y = y.f_add(&x.f_matmul(at)?.f_matmul(bt)?)?;
            } else {
                let delta = x.f_index_select(0, rows)?.f_matmul(at)?.f_matmul(bt)?;
                y = y.f_index_add(0, rows, &delta)?;
            }
        }
        Ok(y)
    }
}
