//! The CPU f32 path: the same Llama-family forward as [`crate::model`], on plain host slices
//! instead of candle tensors.
//!
//! Decode steps are dominated by matmuls with few activation rows, which are memory-bound
//! sweeps over the weights, and by per-sequence attention over short caches, where per-op tensor
//! overhead outweighs the arithmetic. Here every projection is one multi-threaded sweep
//! ([`packed::PackedMatrix::matmul`], weights packed in panels of output columns at load),
//! and attention for all chunks of a batch is one parallel loop that reads each slot's cache in
//! place.
//! Threads come from candle's persistent CPU pool, so no thread is spawned per call.

mod kernels;
mod kv;
mod packed;
mod pool;

use infermux_core::{BackendError, ForwardBatch, ModelConfig};

use crate::error::CandleBackendError;
use crate::kv_cache::KvShape;
use crate::weights::Weights;
use kernels::{SyncPtr, par_ranges};
pub(crate) use kv::HostKv;
use packed::PackedMatrix;

/// `x @ wᵀ + b` with `w` (`[out, in]`) packed for the matmul kernel.
struct HostLinear {
    w: PackedMatrix,
    b: Option<Vec<f32>>,
}

impl HostLinear {
    fn new(w: Vec<f32>, b: Option<Vec<f32>>, out: usize, inp: usize) -> Self {
        Self {
            w: PackedMatrix::pack(&w, out, inp),
            b,
        }
    }

    fn forward(&self, x: &[f32], m: usize, out: &mut [f32], accumulate: bool) {
        self.w.matmul(x, m, self.b.as_deref(), out, accumulate);
    }
}

struct HostLayer {
    input_norm: Vec<f32>,
    qkv: HostLinear,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    o: HostLinear,
    post_norm: Vec<f32>,
    gate_up: HostLinear,
    down: HostLinear,
}

/// The model with its weights as host `f32` vectors.
pub(crate) struct HostLlama {
    cfg: ModelConfig,
    /// `None` when tied to the output head: rows are then read from `lm_head`.
    embed: Option<Vec<f32>>,
    layers: Vec<HostLayer>,
    norm: Vec<f32>,
    lm_head: PackedMatrix,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

fn host(t: candle_core::Tensor) -> Result<Vec<f32>, CandleBackendError> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| CandleBackendError::Weights(e.to_string()))
}

fn runtime(message: String) -> BackendError {
    BackendError::Runtime {
        runtime: "candle",
        message,
    }
}

impl HostLlama {
    /// Loads the weights (f32, on the CPU) named as Hugging Face names them.
    pub fn load(cfg: &ModelConfig, w: &Weights) -> Result<Self, CandleBackendError> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (q_out, kv_out) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        let inter = cfg.intermediate_size;
        let get = |n: &str, s: &[usize]| w.get(n, s).and_then(host);
        let cat = |parts: &[(&str, &[usize])]| -> Result<Vec<f32>, CandleBackendError> {
            let mut v = Vec::new();
            for (n, s) in parts {
                v.extend(get(n, s)?);
            }
            Ok(v)
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let n = |s: &str| format!("{p}.{s}");
            let qkv_w = cat(&[
                (&n("self_attn.q_proj.weight"), &[q_out, h]),
                (&n("self_attn.k_proj.weight"), &[kv_out, h]),
                (&n("self_attn.v_proj.weight"), &[kv_out, h]),
            ])?;
            let qkv_b = if cfg.attention_bias {
                Some(cat(&[
                    (&n("self_attn.q_proj.bias"), &[q_out]),
                    (&n("self_attn.k_proj.bias"), &[kv_out]),
                    (&n("self_attn.v_proj.bias"), &[kv_out]),
                ])?)
            } else {
                None
            };
            let norm = |s: &str| {
                if cfg.qk_norm {
                    get(&n(s), &[hd]).map(Some)
                } else {
                    Ok(None)
                }
            };
            layers.push(HostLayer {
                input_norm: get(&n("input_layernorm.weight"), &[h])?,
                qkv: HostLinear::new(qkv_w, qkv_b, q_out + 2 * kv_out, h),
                q_norm: norm("self_attn.q_norm.weight")?,
                k_norm: norm("self_attn.k_norm.weight")?,
                o: HostLinear::new(
                    get(&n("self_attn.o_proj.weight"), &[h, q_out])?,
                    None,
                    h,
                    q_out,
                ),
                post_norm: get(&n("post_attention_layernorm.weight"), &[h])?,
                gate_up: HostLinear::new(
                    cat(&[
                        (&n("mlp.gate_proj.weight"), &[inter, h]),
                        (&n("mlp.up_proj.weight"), &[inter, h]),
                    ])?,
                    None,
                    2 * inter,
                    h,
                ),
                down: HostLinear::new(
                    get(&n("mlp.down_proj.weight"), &[h, inter])?,
                    None,
                    h,
                    inter,
                ),
            });
        }
        let embed = get("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let untied = if cfg.tie_word_embeddings {
            None
        } else {
            w.get_opt("lm_head.weight", &[cfg.vocab_size, h])?
                .map(host)
                .transpose()?
        };
        let (embed, lm_head) = match untied {
            Some(head) => (Some(embed), PackedMatrix::pack(&head, cfg.vocab_size, h)),
            None => (None, PackedMatrix::pack(&embed, cfg.vocab_size, h)),
        };
        let (cos, sin) = cfg.rope_tables(cfg.max_position_embeddings);
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            layers,
            norm: get("model.norm.weight", &[h])?,
            lm_head,
            cos,
            sin,
        })
    }

    /// The cache shape this model needs.
    pub fn kv_shape(&self) -> KvShape {
        KvShape {
            num_layers: self.cfg.num_layers,
            num_kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
        }
    }

    /// Runs `batch`, updating `kv`, and returns the requested logits rows (`rows × vocab`).
    pub fn forward(&self, batch: &ForwardBatch, kv: &mut HostKv) -> Result<Vec<f32>, BackendError> {
        let cfg = &self.cfg;
        let (h, hd, nh, nkv) = (
            cfg.hidden_size,
            cfg.head_dim,
            cfg.num_heads,
            cfg.num_kv_heads,
        );
        let (q_out, kv_out) = (nh * hd, nkv * hd);
        let qkv_dim = q_out + 2 * kv_out;
        let inter = cfg.intermediate_size;
        let eps = cfg.rms_norm_eps as f32;
        let n = batch.num_tokens();
        if let Some(&t) = batch
            .chunks
            .iter()
            .flat_map(|c| &c.tokens)
            .find(|&&t| t as usize >= cfg.vocab_size)
        {
            return Err(runtime(format!(
                "token id {t} is outside the vocabulary ({})",
                cfg.vocab_size
            )));
        }
        for c in &batch.chunks {
            kv.reserve(c.slot, c.tokens.len());
        }
        let positions: Vec<usize> = batch
            .chunks
            .iter()
            .flat_map(|c| c.start_pos..c.start_pos + c.tokens.len())
            .collect();

        let mut x = vec![0f32; n * h];
        for (&t, row) in batch
            .chunks
            .iter()
            .flat_map(|c| &c.tokens)
            .zip(x.chunks_exact_mut(h))
        {
            match &self.embed {
                Some(embed) => row.copy_from_slice(&embed[t as usize * h..][..h]),
                None => self.lm_head.row_into(t as usize, row),
            }
        }
        let mut hbuf = vec![0f32; n * h];
        let mut qkv = vec![0f32; n * qkv_dim];
        let mut attn = vec![0f32; n * q_out];
        let mut gu = vec![0f32; n * 2 * inter];
        let mut act = vec![0f32; n * inter];
        let half = hd / 2;
        for (li, layer) in self.layers.iter().enumerate() {
            kernels::rms_norm(&x, &layer.input_norm, eps, &mut hbuf);
            layer.qkv.forward(&hbuf, n, &mut qkv, false);
            for (row, &pos) in qkv.chunks_exact_mut(qkv_dim).zip(&positions) {
                let (cos, sin) = (
                    &self.cos[pos * half..][..half],
                    &self.sin[pos * half..][..half],
                );
                let (q, k) = row[..q_out + kv_out].split_at_mut(q_out);
                for (heads, norm) in [(q, &layer.q_norm), (k, &layer.k_norm)] {
                    for head in heads.chunks_exact_mut(hd) {
                        if let Some(w) = norm {
                            let copy: Vec<f32> = head.to_vec();
                            kernels::rms_norm(&copy, w, eps, head);
                        }
                        kernels::rope(head, cos, sin);
                    }
                }
            }
            self.attention(li, batch, &qkv, kv, &mut attn);
            layer.o.forward(&attn, n, &mut x, true);
            kernels::rms_norm(&x, &layer.post_norm, eps, &mut hbuf);
            layer.gate_up.forward(&hbuf, n, &mut gu, false);
            let rows_per = (4096 / inter).max(1);
            let act_ptr = SyncPtr(act.as_mut_ptr());
            par_ranges(n, if n * inter < 1 << 16 { n } else { rows_per }, |rows| {
                for r in rows {
                    let g = &gu[r * 2 * inter..][..inter];
                    let u = &gu[r * 2 * inter + inter..][..inter];
                    // SAFETY: row r of `act` is written by this range only.
                    let o = unsafe {
                        std::slice::from_raw_parts_mut(act_ptr.get().add(r * inter), inter)
                    };
                    kernels::swiglu(g, u, o);
                }
            });
            layer.down.forward(&act, n, &mut x, true);
        }
        for c in &batch.chunks {
            if let Some(s) = kv.slots.get_mut(&c.slot) {
                s.len += c.tokens.len();
            }
        }
        let rows = batch.logit_row_indices();
        let mut xs = Vec::with_capacity(rows.len() * h);
        for &r in &rows {
            xs.extend_from_slice(&x[r * h..][..h]);
        }
        let mut normed = vec![0f32; xs.len()];
        kernels::rms_norm(&xs, &self.norm, eps, &mut normed);
        let mut logits = vec![0f32; rows.len() * cfg.vocab_size];
        self.lm_head
            .matmul(&normed, rows.len(), None, &mut logits, false);
        Ok(logits)
    }

    /// Appends every chunk's new keys and values for layer `li`, then attends each chunk's
    /// queries to its slot's cache, all chunks and KV heads in one parallel loop.
    fn attention(
        &self,
        li: usize,
        batch: &ForwardBatch,
        qkv: &[f32],
        kv: &mut HostKv,
        out: &mut [f32],
    ) {
        let cfg = &self.cfg;
        let (hd, nh, nkv) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
        let (q_out, kv_out) = (nh * hd, nkv * hd);
        let qkv_dim = q_out + 2 * kv_out;
        let groups = nh / nkv;
        let scale = 1.0 / (hd as f32).sqrt();

        // Write the new keys and values, and list the work: (chunk, kv head, query block).
        const QUERY_BLOCK: usize = 16;
        let mut offsets = Vec::with_capacity(batch.chunks.len());
        let mut units = Vec::new();
        let mut offset = 0;
        for (ci, c) in batch.chunks.iter().enumerate() {
            let t = c.tokens.len();
            let s = kv
                .slots
                .get_mut(&c.slot)
                .expect("reserve() creates the slot");
            let cap = s.capacity;
            let (kc, vc) = &mut s.layers[li];
            for i in 0..t {
                let row = &qkv[(offset + i) * qkv_dim..][..qkv_dim];
                for g in 0..nkv {
                    let dst = (g * cap + c.start_pos + i) * hd;
                    kc[dst..dst + hd].copy_from_slice(&row[q_out + g * hd..][..hd]);
                    vc[dst..dst + hd].copy_from_slice(&row[q_out + kv_out + g * hd..][..hd]);
                }
            }
            for g in 0..nkv {
                for q0 in (0..t).step_by(QUERY_BLOCK) {
                    units.push((ci, g, q0..(q0 + QUERY_BLOCK).min(t)));
                }
            }
            offsets.push(offset);
            offset += t;
        }
        let slots: Vec<&kv::HostSlot> = batch.chunks.iter().map(|c| &kv.slots[&c.slot]).collect();
        let dst = SyncPtr(out.as_mut_ptr());
        par_ranges(units.len(), 1, |range| {
            let (mut qs, mut scores) = (Vec::new(), Vec::new());
            for (ci, g, queries) in units[range].iter().cloned() {
                let c = &batch.chunks[ci];
                let s = slots[ci];
                let (kc, vc) = &s.layers[li];
                let keys = &kc[g * s.capacity * hd..];
                let values = &vc[g * s.capacity * hd..];
                // The block's queries of this KV head's `groups` heads, as contiguous rows.
                let rows = queries.len() * groups;
                qs.clear();
                for i in queries.clone() {
                    let row = &qkv[(offsets[ci] + i) * qkv_dim..];
                    qs.extend_from_slice(&row[g * groups * hd..][..groups * hd]);
                }
                // Scores against every key any query of the block may see; each query then
                // uses only its causal prefix.
                let seen = c.start_pos + queries.end;
                scores.clear();
                scores.resize(rows * seen, 0.0);
                kernels::matmul_serial(&qs, rows, hd, &keys[..seen * hd], seen, &mut scores);
                for (bi, i) in queries.enumerate() {
                    let tok = offsets[ci] + i;
                    let total = c.start_pos + i + 1;
                    for q in 0..groups {
                        let sc = &mut scores[(bi * groups + q) * seen..][..total];
                        let mut max = f32::NEG_INFINITY;
                        for v in sc.iter_mut() {
                            *v *= scale;
                            max = max.max(*v);
                        }
                        for v in sc.iter_mut() {
                            *v -= max;
                        }
                        kernels::exp_inplace(sc);
                        let inv = 1.0 / sc.iter().sum::<f32>();
                        for v in sc.iter_mut() {
                            *v *= inv;
                        }
                        let head = g * groups + q;
                        // SAFETY: head `head` of token `tok` belongs to this unit only.
                        let o = unsafe {
                            std::slice::from_raw_parts_mut(
                                dst.get().add(tok * q_out + head * hd),
                                hd,
                            )
                        };
                        kernels::weighted_sum(sc, values, o);
                    }
                }
            }
        });
    }
}
