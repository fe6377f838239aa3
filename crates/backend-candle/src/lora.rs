//! LoRA adapters on candle tensors: each site's `Aᵀ` and `Bᵀ` on the device in the serving
//! dtype, and the update of [`LlamaOps::lora`](infermux_core::model::LlamaOps::lora).
//!
//! A batch on one adapter adds `(x Aᵀ) Bᵀ`. A batch that mixes adapters (or adapters and the
//! base) runs them all in one matmul pair per site, as punica/S-LoRA's segmented kernels do:
//! the batch's adapters are stacked side by side (`[Aᵀ₁ Aᵀ₂ …]`, `[Bᵀ₁; Bᵀ₂; …]`, each padded
//! with zeros to its widest rank) and a 0/1 mask keeps each row's own adapter columns of
//! `x [Aᵀ₁ Aᵀ₂ …]`, so the product with the stacked `Bᵀ` is each row's own update. Measured
//! (`cargo xtask bench-rl`, 32 requests over 4 adapters and the base): a gather, a matmul pair
//! and an index-add per adapter and site cost 32 % of the base's decode throughput; the stack
//! is rebuilt only when the batch's set of adapters changes.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use infermux_core::model::{LoraAdapter, LoraSite};
use infermux_core::{AdapterId, ForwardBatch};

/// Per layer, per site: `(Aᵀ [inp, rank], Bᵀ [rank, out])`.
type Sites = Vec<[Option<(Tensor, Tensor)>; 4]>;

/// One adapter's matrices.
pub(crate) struct CandleLora {
    layers: Sites,
    /// Its widest rank: the columns it takes in a stack.
    width: usize,
}

impl CandleLora {
    /// Uploads `adapter` to `device` in `dtype`.
    pub fn upload(
        adapter: &LoraAdapter,
        device: &Device,
        dtype: DType,
    ) -> candle_core::Result<Self> {
        let mut layers = Vec::with_capacity(adapter.layers.len());
        let mut width = 0;
        for sites in &adapter.layers {
            let mut out: [Option<(Tensor, Tensor)>; 4] = Default::default();
            for (slot, update) in out.iter_mut().zip(sites) {
                if let Some(u) = update {
                    let a = Tensor::from_slice(&u.a, (u.rank, u.inp), device)?;
                    let b = Tensor::from_slice(&u.b, (u.out, u.rank), device)?;
                    width = width.max(u.rank);
                    *slot = Some((
                        a.t()?.contiguous()?.to_dtype(dtype)?,
                        b.t()?.contiguous()?.to_dtype(dtype)?,
                    ));
                }
            }
            layers.push(out);
        }
        Ok(Self { layers, width })
    }

    fn site(&self, layer: usize, site: LoraSite) -> Option<&(Tensor, Tensor)> {
        self.layers
            .get(layer)
            .and_then(|l| l[site.index()].as_ref())
    }
}

/// Several adapters side by side: per site `[Aᵀ₁ Aᵀ₂ …]` and `[Bᵀ₁; Bᵀ₂; …]`, each adapter
/// `width` columns (rows of `Bᵀ`) wide, zeros where its rank is narrower or it skips the site.
pub(crate) struct Stack {
    ids: Vec<AdapterId>,
    /// First column of each of `ids`.
    offsets: Vec<usize>,
    width: usize,
    layers: Sites,
}

impl Stack {
    fn build(
        ids: Vec<AdapterId>,
        loaded: &HashMap<AdapterId, Arc<CandleLora>>,
    ) -> candle_core::Result<Self> {
        let adapters: Vec<&CandleLora> = ids
            .iter()
            .map(|id| match loaded.get(id) {
                Some(lora) => Ok(&**lora),
                None => Err(candle_core::Error::Msg(format!(
                    "no LoRA adapter {id:?} is loaded"
                ))),
            })
            .collect::<candle_core::Result<_>>()?;
        let mut offsets = Vec::with_capacity(ids.len());
        let mut width = 0;
        for lora in &adapters {
            offsets.push(width);
            width += lora.width;
        }
        let num_layers = adapters.iter().map(|l| l.layers.len()).max().unwrap_or(0);
        let mut layers = Vec::with_capacity(num_layers);
        for layer in 0..num_layers {
            let mut out: [Option<(Tensor, Tensor)>; 4] = Default::default();
            for (slot, site) in out.iter_mut().zip(LoraSite::ALL) {
                let Some((at, bt)) = adapters.iter().find_map(|l| l.site(layer, site)) else {
                    continue;
                };
                let (inp, out_dim) = (at.dim(0)?, bt.dim(1)?);
                let (mut a_parts, mut b_parts) = (Vec::new(), Vec::new());
                let zeros = |shape: (usize, usize)| Tensor::zeros(shape, at.dtype(), at.device());
                for lora in &adapters {
                    let Some((a, b)) = lora.site(layer, site).cloned() else {
                        a_parts.push(zeros((inp, lora.width))?);
                        b_parts.push(zeros((lora.width, out_dim))?);
                        continue;
                    };
                    let pad = lora.width - a.dim(1)?;
                    if pad > 0 {
                        a_parts.push(Tensor::cat(&[a, zeros((inp, pad))?], 1)?);
                        b_parts.push(Tensor::cat(&[b, zeros((pad, out_dim))?], 0)?);
                    } else {
                        a_parts.push(a);
                        b_parts.push(b);
                    }
                }
                *slot = Some((Tensor::cat(&a_parts, 1)?, Tensor::cat(&b_parts, 0)?));
            }
            layers.push(out);
        }
        Ok(Self {
            ids,
            offsets,
            width,
            layers,
        })
    }
}

/// The loaded adapters, and the stack of the last batch that mixed them.
#[derive(Default)]
pub(crate) struct CandleAdapters {
    loaded: HashMap<AdapterId, Arc<CandleLora>>,
    stack: Option<Arc<Stack>>,
}

impl CandleAdapters {
    pub fn insert(&mut self, id: AdapterId, lora: CandleLora) {
        self.stack = None;
        self.loaded.insert(id, Arc::new(lora));
    }

    pub fn remove(&mut self, id: AdapterId) {
        self.stack = None;
        self.loaded.remove(&id);
    }

    pub fn contains(&self, id: AdapterId) -> bool {
        self.loaded.contains_key(&id)
    }

    /// How `batch`'s rows take their adapters' updates; stacks the batch's adapters unless the
    /// last mixed batch had the same ones.
    pub fn rows(
        &mut self,
        batch: &ForwardBatch,
        device: &Device,
        dtype: DType,
    ) -> candle_core::Result<AdapterRows> {
        let groups = batch.adapter_rows();
        let total = batch.num_tokens();
        match groups.as_slice() {
            [] => return Ok(AdapterRows::None),
            [(id, rows)] if rows.len() == total => {
                return match self.loaded.get(id) {
                    Some(lora) => Ok(AdapterRows::All(lora.clone())),
                    None => candle_core::bail!("no LoRA adapter {id:?} is loaded"),
                };
            }
            _ => {}
        }
        let mut ids: Vec<AdapterId> = groups.iter().map(|(id, _)| *id).collect();
        ids.sort();
        let stack = match &self.stack {
            Some(stack) if stack.ids == ids => stack.clone(),
            _ => {
                let stack = Arc::new(Stack::build(ids, &self.loaded)?);
                self.stack = Some(stack.clone());
                stack
            }
        };
        let mut mask = vec![0f32; total * stack.width];
        for (id, rows) in &groups {
            let at = stack.ids.binary_search(id).map_err(|_| {
                candle_core::Error::Msg(format!("adapter {id:?} is not in the stack"))
            })?;
            let (start, width) = (stack.offsets[at], self.loaded[id].width);
            for &row in rows {
                let row = row as usize * stack.width;
                mask[row + start..row + start + width].fill(1.0);
            }
        }
        let mask = Tensor::from_vec(mask, (total, stack.width), device)?.to_dtype(dtype)?;
        Ok(AdapterRows::Masked { stack, mask })
    }
}

/// How one batch's rows take their adapters' updates.
pub(crate) enum AdapterRows {
    /// No row runs an adapter.
    None,
    /// One adapter runs every row.
    All(Arc<CandleLora>),
    /// Rows on different adapters (or some on the base): the stack and each row's 0/1 mask of
    /// its columns (all zeros for a base row).
    Masked { stack: Arc<Stack>, mask: Tensor },
}

impl AdapterRows {
    /// `y` plus each row's adapter update of `site` in `layer` on `x`.
    pub fn apply(
        &self,
        x: &Tensor,
        y: Tensor,
        layer: usize,
        site: LoraSite,
    ) -> candle_core::Result<Tensor> {
        match self {
            Self::None => Ok(y),
            Self::All(lora) => match lora.site(layer, site) {
                Some((at, bt)) => y + x.matmul(at)?.matmul(bt)?,
                None => Ok(y),
            },
            Self::Masked { stack, mask } => {
                match stack
                    .layers
                    .get(layer)
                    .and_then(|l| l[site.index()].as_ref())
                {
                    Some((at, bt)) => y + (x.matmul(at)? * mask)?.matmul(bt)?,
                    None => Ok(y),
                }
            }
        }
    }
}
