//! How one batch's rows take their LoRA adapters' updates, for every backend alike.
//!
//! A batch on one adapter adds `(x Aᵀ) Bᵀ` to every row. A batch that mixes adapters (or
//! adapters and the base) runs them all in one matmul pair per site, as punica/S-LoRA's
//! segmented kernels do: the batch's adapters sit side by side (`[Aᵀ₁ Aᵀ₂ …]`,
//! `[Bᵀ₁; Bᵀ₂; …]`, each padded with zeros to its widest rank) and a 0/1 mask keeps each row's
//! own adapter's columns of `x [Aᵀ₁ Aᵀ₂ …]`, so the product with the stacked `Bᵀ` is each row's
//! own update (a base row's mask is all zeros). The zeros add exactly nothing. Measured on
//! candle (`cargo xtask bench-rl`, 32 requests over 4 adapters and the base): a gather, a
//! matmul pair and an index-add per adapter and site held the batch to 68 % of the base's
//! decode throughput.

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;

use crate::backend::{AdapterId, ForwardBatch};
use crate::model::lora::{LoraAdapter, LoraSite, LoraUpdate};

/// What a batch asks of the adapters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchLora {
    /// No row runs an adapter.
    None,
    /// One adapter runs every row.
    All(AdapterId),
    /// Rows on several adapters, or on adapters and the base: these adapters, sorted.
    Mixed(Vec<AdapterId>),
}

impl BatchLora {
    /// What `batch` asks.
    pub fn of(batch: &ForwardBatch) -> Self {
        let groups = batch.adapter_rows();
        match groups.as_slice() {
            [] => Self::None,
            [(id, rows)] if rows.len() == batch.num_tokens() => Self::All(*id),
            _ => {
                let mut ids: Vec<AdapterId> = groups.iter().map(|(id, _)| *id).collect();
                ids.sort();
                Self::Mixed(ids)
            }
        }
    }
}

/// The column layout of stacked adapters: each adapter's columns of `[Aᵀ₁ Aᵀ₂ …]` (its
/// widest rank over the sites; narrower sites and sites it skips are zeros).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraStack {
    /// The adapters, sorted.
    pub ids: Vec<AdapterId>,
    /// Each adapter's columns, in the order of `ids`.
    pub columns: Vec<Range<usize>>,
    /// All the columns.
    pub width: usize,
}

impl LoraStack {
    /// The layout of `ids` (sorted), each `width_of` columns wide; `None` for an id
    /// `width_of` does not know.
    pub fn new(ids: Vec<AdapterId>, width_of: impl Fn(AdapterId) -> Option<usize>) -> Option<Self> {
        let mut columns = Vec::with_capacity(ids.len());
        let mut width = 0;
        for &id in &ids {
            let w = width_of(id)?;
            columns.push(width..width + w);
            width += w;
        }
        Some(Self {
            ids,
            columns,
            width,
        })
    }

    /// `adapters` (those of `ids`, in order) side by side: one adapter of rank `width` whose
    /// every site is `[A₁; A₂; …]` (`[width, inp]`) and `[B₁ B₂ …]` (`[out, width]`), each
    /// adapter's block padded with zeros to its columns (a site an adapter skips is all
    /// zeros); a site no adapter updates stays none. A backend uploads it like any adapter.
    pub fn stacked<'a>(&self, adapters: &[&'a LoraAdapter]) -> LoraAdapter {
        assert_eq!(adapters.len(), self.ids.len(), "one adapter per stacked id");
        let num_layers = adapters.iter().map(|a| a.layers.len()).max().unwrap_or(0);
        let layers = (0..num_layers)
            .map(|layer| {
                LoraSite::ALL.map(|site| {
                    let of = |a: &'a LoraAdapter| a.layers.get(layer)?[site.index()].as_ref();
                    let shape = adapters.iter().find_map(|a| of(a))?;
                    let (inp, out, width) = (shape.inp, shape.out, self.width);
                    let mut a = vec![0f32; width * inp];
                    let mut b = vec![0f32; out * width];
                    for (adapter, cols) in adapters.iter().zip(&self.columns) {
                        let Some(u) = of(adapter) else { continue };
                        a[cols.start * inp..][..u.rank * inp].copy_from_slice(&u.a);
                        for (o, row) in u.b.chunks_exact(u.rank).enumerate() {
                            b[o * width + cols.start..][..u.rank].copy_from_slice(row);
                        }
                    }
                    Some(LoraUpdate {
                        rank: width,
                        inp,
                        out,
                        a,
                        b,
                    })
                })
            })
            .collect();
        let mut targets: Vec<String> = adapters.iter().flat_map(|a| a.targets.clone()).collect();
        targets.sort();
        targets.dedup();
        LoraAdapter {
            path: PathBuf::from(format!("stack of {:?}", self.ids)),
            rank: self.width,
            alpha: self.width as f64,
            scale: 1.0,
            targets,
            layers,
        }
    }

    /// The `[batch.num_tokens(), width]` row-major mask: 1 on each row's adapter's columns, 0
    /// elsewhere; `None` if a row names an adapter not in the stack.
    pub fn mask(&self, batch: &ForwardBatch) -> Option<Vec<f32>> {
        let mut mask = vec![0f32; batch.num_tokens() * self.width];
        for (id, rows) in batch.adapter_rows() {
            let at = self.ids.binary_search(&id).ok()?;
            let cols = &self.columns[at];
            for row in rows {
                let start = row as usize * self.width;
                mask[start + cols.start..start + cols.end].fill(1.0);
            }
        }
        Some(mask)
    }
}

/// A backend's loaded adapters (`L`: one uploaded to its runtime) with their host copies, and
/// the uploaded stack of the last batch that mixed them: the bookkeeping every backend shares.
pub struct AdapterSet<L> {
    loaded: HashMap<AdapterId, (LoraAdapter, L)>,
    stack: Option<(LoraStack, L)>,
}

impl<L> Default for AdapterSet<L> {
    fn default() -> Self {
        Self {
            loaded: HashMap::new(),
            stack: None,
        }
    }
}

/// What a batch runs.
pub struct BatchAdapters<'a, L> {
    /// The adapter (or stack) its rows take.
    pub lora: &'a L,
    /// For a stack, the row mask ([`LoraStack::mask`], `[rows, width]` row-major) and `width`.
    pub mask: Option<(Vec<f32>, usize)>,
}

/// Why a batch's adapters could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum AdapterSetError<E> {
    /// A chunk names an adapter that is not loaded.
    #[error("no LoRA adapter {0:?} is loaded")]
    Unknown(AdapterId),
    /// Uploading the stack failed.
    #[error("uploading the batch's stacked adapters: {0}")]
    Upload(E),
}

impl<L> AdapterSet<L> {
    /// Keeps `adapter` (uploaded as `lora`) as `id`, replacing one of that id.
    pub fn insert(&mut self, id: AdapterId, adapter: &LoraAdapter, lora: L) {
        self.stack = None;
        self.loaded.insert(id, (adapter.clone(), lora));
    }

    /// Drops adapter `id`.
    pub fn remove(&mut self, id: AdapterId) {
        self.stack = None;
        self.loaded.remove(&id);
    }

    /// Whether `id` is loaded.
    pub fn contains(&self, id: AdapterId) -> bool {
        self.loaded.contains_key(&id)
    }

    /// What `batch` runs (`None`: no adapter); a mix's adapters are stacked and uploaded with
    /// `upload` unless the last mixed batch had the same ones.
    pub fn for_batch<E>(
        &mut self,
        batch: &ForwardBatch,
        upload: impl FnOnce(&LoraAdapter) -> Result<L, E>,
    ) -> Result<Option<BatchAdapters<'_, L>>, AdapterSetError<E>> {
        let ids = match BatchLora::of(batch) {
            BatchLora::None => return Ok(None),
            BatchLora::All(id) => {
                let (_, lora) = self.loaded.get(&id).ok_or(AdapterSetError::Unknown(id))?;
                return Ok(Some(BatchAdapters { lora, mask: None }));
            }
            BatchLora::Mixed(ids) => ids,
        };
        if self
            .stack
            .as_ref()
            .is_none_or(|(layout, _)| layout.ids != ids)
        {
            self.stack = None;
            let hosts = ids
                .iter()
                .map(|id| {
                    self.loaded
                        .get(id)
                        .map(|(host, _)| host)
                        .ok_or(AdapterSetError::Unknown(*id))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let layout = LoraStack::new(ids.clone(), |id| Some(self.loaded.get(&id)?.0.width()))
                .ok_or(AdapterSetError::Unknown(ids[0]))?;
            let lora = upload(&layout.stacked(&hosts)).map_err(AdapterSetError::Upload)?;
            self.stack = Some((layout, lora));
        }
        let Some((layout, lora)) = &self.stack else {
            unreachable!("the stack was just built")
        };
        // Every row's adapter is one of the stack's (they came from the batch).
        let mask = layout
            .mask(batch)
            .ok_or(AdapterSetError::Unknown(layout.ids[0]))?;
        Ok(Some(BatchAdapters {
            lora,
            mask: Some((mask, layout.width)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{LogitsWanted, SeqChunk, SlotId};

    fn batch(chunks: &[(usize, Option<u32>)]) -> ForwardBatch {
        ForwardBatch {
            chunks: chunks
                .iter()
                .enumerate()
                .map(|(i, &(len, adapter))| SeqChunk {
                    slot: SlotId(i as u32),
                    start_pos: 0,
                    tokens: vec![1; len],
                    logits: LogitsWanted::Last,
                    adapter: adapter.map(AdapterId),
                })
                .collect(),
        }
    }

    #[test]
    fn a_batch_is_classified_by_its_adapters() {
        assert_eq!(
            BatchLora::of(&batch(&[(2, None), (1, None)])),
            BatchLora::None
        );
        assert_eq!(
            BatchLora::of(&batch(&[(2, Some(3)), (1, Some(3))])),
            BatchLora::All(AdapterId(3))
        );
        assert_eq!(
            BatchLora::of(&batch(&[(2, Some(3)), (1, None)])),
            BatchLora::Mixed(vec![AdapterId(3)])
        );
        assert_eq!(
            BatchLora::of(&batch(&[(1, Some(5)), (1, Some(3))])),
            BatchLora::Mixed(vec![AdapterId(3), AdapterId(5)])
        );
    }

    #[test]
    fn each_row_keeps_only_its_adapters_columns() {
        let b = batch(&[(2, Some(5)), (1, None), (1, Some(3))]);
        let BatchLora::Mixed(ids) = BatchLora::of(&b) else {
            panic!("mixed")
        };
        let stack = LoraStack::new(ids, |id| Some(if id.0 == 3 { 2 } else { 3 })).unwrap();
        assert_eq!(stack.columns, vec![0..2, 2..5]);
        let mask = stack.mask(&b).unwrap();
        #[rustfmt::skip]
        let want = [
            0., 0., 1., 1., 1.,
            0., 0., 1., 1., 1.,
            0., 0., 0., 0., 0.,
            1., 1., 0., 0., 0.,
        ];
        assert_eq!(mask, want);
        // A row on an adapter outside the stack, or an adapter of no known width.
        let other = LoraStack::new(vec![AdapterId(3)], |_| Some(2)).unwrap();
        assert_eq!(other.mask(&b), None);
        assert_eq!(LoraStack::new(vec![AdapterId(9)], |_| None), None);
    }

    fn update(rank: usize, inp: usize, out: usize, salt: f32) -> LoraUpdate {
        let v = |n: usize, s: f32| (0..n).map(|i| i as f32 + s).collect();
        LoraUpdate {
            rank,
            inp,
            out,
            a: v(rank * inp, salt),
            b: v(out * rank, salt + 0.5),
        }
    }

    fn adapter(layers: Vec<[Option<LoraUpdate>; 4]>) -> LoraAdapter {
        LoraAdapter {
            path: "a".into(),
            rank: 2,
            alpha: 2.0,
            scale: 1.0,
            targets: vec!["q_proj".into()],
            layers,
        }
    }

    /// Each row's update through the stack, `B_stack (mask ⊙ (A_stack x))`, equals its own
    /// adapter's `B (A x)` (and zero for a base row), with ranks that differ and a site one
    /// adapter skips.
    #[test]
    fn the_stack_gives_each_row_its_own_adapters_update() {
        let (inp, out) = (3, 2);
        let one = adapter(vec![[Some(update(2, inp, out, 0.0)), None, None, None]]);
        let two = adapter(vec![[
            Some(update(1, inp, out, 10.0)),
            Some(update(1, inp, out, 20.0)),
            None,
            None,
        ]]);
        let stack = LoraStack::new(vec![AdapterId(1), AdapterId(2)], |id| {
            Some(if id.0 == 1 { 2 } else { 1 })
        })
        .unwrap();
        let stacked = stack.stacked(&[&one, &two]);
        assert_eq!(stacked.width(), 3);
        assert!(stacked.layers[0][2].is_none(), "no adapter updates gate_up");
        let apply = |u: &LoraUpdate, x: &[f32], keep: &dyn Fn(usize) -> bool| -> Vec<f32> {
            let h: Vec<f32> = (0..u.rank)
                .map(|k| {
                    if keep(k) {
                        (0..u.inp).map(|t| u.a[k * u.inp + t] * x[t]).sum()
                    } else {
                        0.0
                    }
                })
                .collect();
            (0..u.out)
                .map(|o| (0..u.rank).map(|k| u.b[o * u.rank + k] * h[k]).sum())
                .collect()
        };
        let x = [1.0, -2.0, 0.5];
        for site in [0, 1] {
            let s = stacked.layers[0][site].as_ref().unwrap();
            for (adapter, cols) in [&one, &two].into_iter().zip(&stack.columns) {
                let got = apply(s, &x, &|k| cols.contains(&k));
                let want = match &adapter.layers[0][site] {
                    Some(u) => apply(u, &x, &|_| true),
                    None => vec![0.0; out],
                };
                assert_eq!(got, want, "site {site}, columns {cols:?}");
            }
            assert_eq!(apply(s, &x, &|_| false), vec![0.0; out], "a base row");
        }
    }
}
