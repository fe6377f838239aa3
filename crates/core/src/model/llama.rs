//! The Llama-family forward pass, written once over a small op set.
//!
//! A backend implements [`LoadOps`] (turn [`TensorSpec`]s / [`LinearSpec`]s of the
//! [`WeightPlan`] into its own weight handles) and [`LlamaOps`] (the ops of one forward pass over
//! a flattened batch). Activations are rows: one per token of the batch, `width` values each;
//! which tokens, at which positions, against which KV slots, is the op implementation's business
//! (it holds the batch). The ONNX backend implements the same ops by recording graph nodes.

use crate::model::config::ModelConfig;
use crate::model::lora::LoraSite;
use crate::model::plan::{LinearSpec, TensorSpec, WeightPlan};

/// Head layout of attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (`num_heads` is a multiple of it).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

impl AttentionShape {
    /// Query heads sharing one KV head.
    pub fn groups(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// `1 / sqrt(head_dim)`, the score scale.
    pub fn scale(&self) -> f64 {
        1.0 / (self.head_dim as f64).sqrt()
    }
}

/// Turns the plan's tensors into a backend's weight handles.
pub trait LoadOps {
    /// A projection (possibly fused from several checkpoint tensors, with an optional bias).
    type Linear;
    /// A vector parameter (norm weights).
    type Vector;
    /// The embedding table.
    type Embedding;
    /// The backend's error.
    type Error;

    /// Loads a projection: the parts concatenated along the output dimension.
    fn linear(&mut self, spec: &LinearSpec) -> Result<Self::Linear, Self::Error>;
    /// Loads a vector.
    fn vector(&mut self, spec: &TensorSpec) -> Result<Self::Vector, Self::Error>;
    /// Loads the embedding table; `tied_head` is the already loaded output head when the two
    /// share one matrix, so a backend can keep a single copy.
    fn embedding(
        &mut self,
        spec: &TensorSpec,
        tied_head: Option<&Self::Linear>,
    ) -> Result<Self::Embedding, Self::Error>;
}

/// The ops of one forward pass over a flattened batch.
///
/// Every `Tensor` is a set of rows, one per token of the batch (or per logits row after
/// [`LlamaOps::logit_rows`]).
pub trait LlamaOps {
    /// Activations.
    type Tensor;
    /// What [`LlamaOps::logits`] returns (the tensor itself, or host rows a backend can hand
    /// out without another copy).
    type Logits;
    /// See [`LoadOps::Linear`].
    type Linear;
    /// See [`LoadOps::Vector`].
    type Vector;
    /// See [`LoadOps::Embedding`].
    type Embedding;
    /// The backend's error.
    type Error;

    /// The embedding rows of the batch's tokens.
    fn embed(&mut self, table: &Self::Embedding) -> Result<Self::Tensor, Self::Error>;
    /// `x @ Wᵀ + b`.
    fn linear(&mut self, x: &Self::Tensor, w: &Self::Linear) -> Result<Self::Tensor, Self::Error>;
    /// `residual + x @ Wᵀ + b` (a backend may fuse the add into the matmul).
    fn linear_add(
        &mut self,
        x: &Self::Tensor,
        w: &Self::Linear,
        residual: Self::Tensor,
    ) -> Result<Self::Tensor, Self::Error> {
        let y = self.linear(x, w)?;
        self.add(residual, &y)
    }
    /// `y` (the projection of `x` at `site` of `layer`) plus each row's LoRA update there,
    /// `(x Aᵀ) Bᵀ`, for rows whose sequence runs an adapter that updates the site; other rows
    /// as they are. The default, for backends without adapters, returns `y`.
    fn lora(
        &mut self,
        _x: &Self::Tensor,
        y: Self::Tensor,
        _layer: usize,
        _site: LoraSite,
    ) -> Result<Self::Tensor, Self::Error> {
        Ok(y)
    }
    /// Splits each row's columns into consecutive pieces of the given widths.
    fn split(
        &mut self,
        x: &Self::Tensor,
        widths: &[usize],
    ) -> Result<Vec<Self::Tensor>, Self::Error>;
    /// RMSNorm of every `width` consecutive values of each row (the whole row, or one head),
    /// scaled by `weight` (`[width]`): `x / sqrt(mean(x²) + eps) * weight`, in f32.
    fn rms_norm(
        &mut self,
        x: &Self::Tensor,
        weight: &Self::Vector,
        width: usize,
        eps: f64,
    ) -> Result<Self::Tensor, Self::Error>;
    /// Rotary embedding (Hugging Face's `rotate_half` layout) of every `head_dim` values of each
    /// row, at the row's token position, with the config's RoPE tables.
    fn rope(&mut self, x: &Self::Tensor, head_dim: usize) -> Result<Self::Tensor, Self::Error>;
    /// Appends `k` and `v` (one row per token) to layer `layer` of each token's KV slot, then
    /// attends each token's query heads causally to its own sequence's cached keys and values
    /// (grouped-query; scores scaled by [`AttentionShape::scale`]). Returns `[tokens, heads ×
    /// head_dim]`.
    fn attention(
        &mut self,
        layer: usize,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        shape: AttentionShape,
    ) -> Result<Self::Tensor, Self::Error>;
    /// `silu(gate) * up` of rows laid out `[gate | up]`, each `inner` wide.
    fn swiglu(&mut self, gate_up: &Self::Tensor, inner: usize)
    -> Result<Self::Tensor, Self::Error>;
    /// `a + b`.
    fn add(&mut self, a: Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor, Self::Error>;
    /// The rows whose logits the batch asks for, in batch order.
    fn logit_rows(&mut self, x: Self::Tensor) -> Result<Self::Tensor, Self::Error>;
    /// The output head over the final normed rows: `x @ headᵀ`, the forward's result.
    fn logits(
        &mut self,
        x: &Self::Tensor,
        head: &Self::Linear,
    ) -> Result<Self::Logits, Self::Error>;
}

/// One decoder layer's weights in a backend's handles.
pub struct LayerWeights<L, V> {
    /// RMSNorm before attention.
    pub input_norm: V,
    /// Fused q/k/v projection.
    pub qkv: L,
    /// Per-head q norm (Qwen3).
    pub q_norm: Option<V>,
    /// Per-head k norm (Qwen3).
    pub k_norm: Option<V>,
    /// Output projection.
    pub o: L,
    /// RMSNorm before the MLP.
    pub post_norm: V,
    /// Fused gate/up projection.
    pub gate_up: L,
    /// Down projection.
    pub down: L,
}

/// A whole model's weights in a backend's handles.
pub struct LlamaWeights<L, V, E> {
    /// Token embeddings.
    pub embed: E,
    /// Decoder layers.
    pub layers: Vec<LayerWeights<L, V>>,
    /// Final norm.
    pub norm: V,
    /// Output head.
    pub lm_head: L,
}

/// A Llama-family model: its config and weight plan, and the forward pass over any op set.
#[derive(Debug, Clone)]
pub struct Llama {
    /// The model's facts.
    pub config: ModelConfig,
    /// Its tensors.
    pub plan: WeightPlan,
}

/// Weights as loaded by `L`.
pub type LoadedWeights<L> =
    LlamaWeights<<L as LoadOps>::Linear, <L as LoadOps>::Vector, <L as LoadOps>::Embedding>;

impl Llama {
    /// The model of `config`; `has_tensor` tells the plan which optional tensors exist.
    pub fn new(config: ModelConfig, has_tensor: impl Fn(&str) -> bool) -> Self {
        let plan = WeightPlan::new(&config, has_tensor);
        Self { config, plan }
    }

    /// The attention head layout.
    pub fn attention_shape(&self) -> AttentionShape {
        AttentionShape {
            num_heads: self.config.num_heads,
            num_kv_heads: self.config.num_kv_heads,
            head_dim: self.config.head_dim,
        }
    }

    /// Loads every tensor of the plan through `loader`.
    pub fn load<L: LoadOps>(&self, loader: &mut L) -> Result<LoadedWeights<L>, L::Error> {
        let plan = &self.plan;
        let mut layers = Vec::with_capacity(plan.layers.len());
        for l in &plan.layers {
            let opt = |loader: &mut L, s: &Option<TensorSpec>| s.as_ref().map(|s| loader.vector(s));
            layers.push(LayerWeights {
                input_norm: loader.vector(&l.input_norm)?,
                qkv: loader.linear(&l.qkv)?,
                q_norm: opt(loader, &l.q_norm).transpose()?,
                k_norm: opt(loader, &l.k_norm).transpose()?,
                o: loader.linear(&l.o)?,
                post_norm: loader.vector(&l.post_norm)?,
                gate_up: loader.linear(&l.gate_up)?,
                down: loader.linear(&l.down)?,
            });
        }
        let lm_head = loader.linear(&plan.lm_head)?;
        let embed = loader.embedding(&plan.embed, plan.tied.then_some(&lm_head))?;
        Ok(LlamaWeights {
            embed,
            layers,
            norm: loader.vector(&plan.norm)?,
            lm_head,
        })
    }

    /// The forward pass: the logits rows the batch held by `ops` asks for.
    pub fn forward<O: LlamaOps>(
        &self,
        ops: &mut O,
        w: &LlamaWeights<O::Linear, O::Vector, O::Embedding>,
    ) -> Result<O::Logits, O::Error> {
        let cfg = &self.config;
        let shape = self.attention_shape();
        let (h, hd, eps) = (cfg.hidden_size, cfg.head_dim, cfg.rms_norm_eps);
        let (q_out, kv_out) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        let mut x = ops.embed(&w.embed)?;
        for (i, l) in w.layers.iter().enumerate() {
            let normed = ops.rms_norm(&x, &l.input_norm, h, eps)?;
            let qkv = ops.linear(&normed, &l.qkv)?;
            let qkv = ops.lora(&normed, qkv, i, LoraSite::Qkv)?;
            let mut parts = ops.split(&qkv, &[q_out, kv_out, kv_out])?.into_iter();
            let (Some(mut q), Some(mut k), Some(v)) = (parts.next(), parts.next(), parts.next())
            else {
                unreachable!("split returns one piece per width")
            };
            if let Some(n) = &l.q_norm {
                q = ops.rms_norm(&q, n, hd, eps)?;
            }
            if let Some(n) = &l.k_norm {
                k = ops.rms_norm(&k, n, hd, eps)?;
            }
            let q = ops.rope(&q, hd)?;
            let k = ops.rope(&k, hd)?;
            let attn = ops.attention(i, &q, &k, &v, shape)?;
            x = ops.linear_add(&attn, &l.o, x)?;
            x = ops.lora(&attn, x, i, LoraSite::O)?;
            let normed = ops.rms_norm(&x, &l.post_norm, h, eps)?;
            let gate_up = ops.linear(&normed, &l.gate_up)?;
            let gate_up = ops.lora(&normed, gate_up, i, LoraSite::GateUp)?;
            let act = ops.swiglu(&gate_up, cfg.intermediate_size)?;
            x = ops.linear_add(&act, &l.down, x)?;
            x = ops.lora(&act, x, i, LoraSite::Down)?;
        }
        let x = ops.logit_rows(x)?;
        let x = ops.rms_norm(&x, &w.norm, h, eps)?;
        ops.logits(&x, &w.lm_head)
    }
}
