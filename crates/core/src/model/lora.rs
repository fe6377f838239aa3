//! LoRA adapters in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`), read
//! and checked against the one model definition's [`WeightPlan`], and laid out for its fused
//! projections: an adapter on q, k and v is one rank-(r_q + r_k + r_v) update of the fused qkv
//! projection, `A` stacked and `B` block-diagonal, with the scale (`lora_alpha / r`, or
//! `lora_alpha / sqrt(r)` with rsLoRA) folded into `B`. A backend only uploads the two matrices
//! of each [`LoraSite`]; [`crate::model::LlamaOps::lora`] adds `(x Aᵀ) Bᵀ` to the projection.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::ModelError;
use crate::model::checkpoint::Checkpoint;
use crate::model::plan::{LinearSpec, WeightPlan};

/// The adapter's configuration file in a PEFT folder.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// The adapter's weights in a PEFT folder.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// A fused projection of a decoder layer that an adapter may update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LoraSite {
    /// q, k and v (output `[q | k | v]`).
    Qkv,
    /// The attention output projection.
    O,
    /// gate and up (output `[gate | up]`).
    GateUp,
    /// The MLP down projection.
    Down,
}

impl LoraSite {
    /// Every site, in [`LoraSite::index`] order.
    pub const ALL: [LoraSite; 4] = [Self::Qkv, Self::O, Self::GateUp, Self::Down];

    /// Position in [`LoraSite::ALL`] (and in [`LoraAdapter::layers`]' arrays).
    pub fn index(self) -> usize {
        self as usize
    }

    fn spec(self, layer: &crate::model::plan::LayerPlan) -> &LinearSpec {
        match self {
            Self::Qkv => &layer.qkv,
            Self::O => &layer.o,
            Self::GateUp => &layer.gate_up,
            Self::Down => &layer.down,
        }
    }
}

/// One site's low-rank update `ΔW = B A` (scale folded into `B`), row-major f32.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraUpdate {
    /// Rank of the fused update (the sum of its parts' ranks).
    pub rank: usize,
    /// Input width of the projection.
    pub inp: usize,
    /// Output width of the projection.
    pub out: usize,
    /// `[rank, inp]`.
    pub a: Vec<f32>,
    /// `[out, rank]`, scaled.
    pub b: Vec<f32>,
}

impl LoraUpdate {
    /// Adds `ΔW = B A` to `weight`, the site's fused `[out, inp]` weight (row-major): the
    /// adapter merged into the base, for a backend whose graph holds its weights (onnx).
    ///
    /// # Panics
    /// When `weight` does not hold `out × inp` values (the caller read the wrong tensor).
    pub fn merge_into(&self, weight: &mut [f32]) {
        assert_eq!(
            weight.len(),
            self.out * self.inp,
            "merge_into: weight shape"
        );
        for (o, row) in weight.chunks_exact_mut(self.inp).enumerate() {
            let b = &self.b[o * self.rank..(o + 1) * self.rank];
            for (k, &bk) in b.iter().enumerate() {
                if bk == 0.0 {
                    continue; // B is block-diagonal: most of a fused row is zero
                }
                let a = &self.a[k * self.inp..(k + 1) * self.inp];
                for (w, &ak) in row.iter_mut().zip(a) {
                    *w += bk * ak;
                }
            }
        }
    }
}

/// A PEFT LoRA adapter, checked against a model's plan and laid out per layer and site.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraAdapter {
    /// The folder it was read from.
    pub path: PathBuf,
    /// `r` of `adapter_config.json`.
    pub rank: usize,
    /// `lora_alpha`.
    pub alpha: f64,
    /// The scale folded into every `B`.
    pub scale: f64,
    /// The module names it targets (`q_proj`, ...), as found in its tensors.
    pub targets: Vec<String>,
    /// Per decoder layer, per [`LoraSite`]: the update, or none.
    pub layers: Vec<[Option<LoraUpdate>; 4]>,
}

/// Why an adapter folder cannot be used with the served model.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// A file is missing, unreadable, or not well-formed JSON / safetensors.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A setting of `adapter_config.json` that infermux does not implement (DoRA, trained
    /// biases, `modules_to_save`, per-module rank patterns, ...).
    #[error("{}: {field}: {reason}", file.display())]
    Unsupported {
        /// The file at fault.
        file: PathBuf,
        /// The field.
        field: &'static str,
        /// What is not supported.
        reason: String,
    },
    /// The adapter targets a module the model does not have as a decoder projection.
    #[error("{}: target module {module:?} is not a projection of this model's decoder layers (it has {known})", file.display())]
    UnknownTarget {
        /// The file at fault.
        file: PathBuf,
        /// The module named.
        module: String,
        /// The projections the model has.
        known: String,
    },
    /// The backend does not run LoRA adapters.
    #[error("this backend does not run LoRA adapters")]
    BackendUnsupported,
    /// The backend failed to take the adapter's tensors.
    #[error("loading adapter {name:?}: {message}")]
    Load {
        /// The adapter's name.
        name: String,
        /// What failed.
        message: String,
    },
    /// No adapter of that name is loaded.
    #[error("no LoRA adapter named {0:?} is loaded")]
    NotFound(String),
    /// An adapter of that name is loaded already (unload it first).
    #[error("a LoRA adapter named {0:?} is loaded already")]
    AlreadyLoaded(String),
    /// As many adapters as allowed are loaded (`max_loras`).
    #[error("{max} LoRA adapters are loaded, the most allowed (max_loras); unload one first")]
    TooMany {
        /// The cap.
        max: usize,
    },
    /// An adapter name that cannot be one (empty, too long, or the base model's name).
    #[error("invalid LoRA adapter name {name:?}: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// Why not.
        reason: &'static str,
    },
    /// The engine thread is gone.
    #[error("the engine has shut down")]
    Shutdown,
    /// A tensor that does not fit the served model (another base model, or a rank that
    /// disagrees with `r`).
    #[error("{}: tensor {tensor}: {reason}", file.display())]
    Mismatch {
        /// The file at fault.
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// How it does not fit.
        reason: String,
    },
}

/// Where one plan part sits: layer, site, row offset in the fused output, rows, input width.
#[derive(Debug, Clone, Copy)]
struct PartPlace {
    layer: usize,
    site: LoraSite,
    offset: usize,
    out: usize,
    inp: usize,
}

/// One part's two matrices as read (`a`: `[r, inp]`, `b`: `[out, r]`).
struct PartUpdate {
    place: PartPlace,
    rank: usize,
    a: Vec<f32>,
    b: Vec<f32>,
}

impl LoraAdapter {
    /// Reads the PEFT adapter in `dir` for the model whose tensors `plan` lists.
    pub fn read(dir: &Path, plan: &WeightPlan) -> Result<Self, AdapterError> {
        let config_path = dir.join(ADAPTER_CONFIG);
        let weights_path = dir.join(ADAPTER_WEIGHTS);
        for (path, file) in [
            (&config_path, ADAPTER_CONFIG),
            (&weights_path, ADAPTER_WEIGHTS),
        ] {
            if !path.is_file() {
                return Err(ModelError::MissingFile {
                    dir: dir.to_path_buf(),
                    file: file.into(),
                }
                .into());
            }
        }
        let text = std::fs::read_to_string(&config_path).map_err(|source| ModelError::Io {
            path: config_path.clone(),
            source,
        })?;
        let config = AdapterConfig::parse(&config_path, &text)?;
        let places = part_places(plan);
        let known: Vec<String> = {
            let mut names: Vec<String> = places.keys().map(|p| short_name(p).to_string()).collect();
            names.sort();
            names.dedup();
            names
        };
        if let Targets::Named(names) = &config.targets
            && let Some(bad) = names.iter().find(|n| !known.contains(n))
        {
            return Err(AdapterError::UnknownTarget {
                file: config_path,
                module: bad.clone(),
                known: known.join(", "),
            });
        }
        let checkpoint = Checkpoint::read(std::slice::from_ref(&weights_path))?;
        let mismatch = |tensor: &str, reason: String| AdapterError::Mismatch {
            file: weights_path.clone(),
            tensor: tensor.to_string(),
            reason,
        };
        // module path → (A name, B name)
        let mut modules: BTreeMap<String, [Option<String>; 2]> = BTreeMap::new();
        for name in checkpoint.tensors.keys() {
            let Some((module, which)) = lora_tensor(name) else {
                return Err(AdapterError::Unsupported {
                    file: weights_path.clone(),
                    field: "tensors",
                    reason: format!(
                        "{name} is not a LoRA A/B matrix (trained embeddings, DoRA magnitudes and \
                         modules_to_save are not supported)"
                    ),
                });
            };
            modules.entry(module).or_default()[which] = Some(name.clone());
        }
        let mut parts = Vec::with_capacity(modules.len());
        let mut targets = Vec::new();
        for (module, [a_name, b_name]) in &modules {
            let short = short_name(module).to_string();
            let Some(&place) = places.get(module.as_str()) else {
                return Err(AdapterError::UnknownTarget {
                    file: weights_path.clone(),
                    module: module.clone(),
                    known: known.join(", "),
                });
            };
            if let Targets::Named(names) = &config.targets
                && !names.contains(&short)
            {
                return Err(mismatch(
                    module,
                    format!("{short} is not in target_modules ({})", names.join(", ")),
                ));
            }
            let (Some(a_name), Some(b_name)) = (a_name, b_name) else {
                return Err(mismatch(module, "needs both lora_A and lora_B".into()));
            };
            let a_shape = &checkpoint.tensors[a_name].shape;
            let b_shape = &checkpoint.tensors[b_name].shape;
            let r = config.rank;
            if a_shape != &[r, place.inp] {
                return Err(mismatch(
                    a_name,
                    format!(
                        "shape {a_shape:?}, expected [r = {r}, {}] (the projection's input width)",
                        place.inp
                    ),
                ));
            }
            if b_shape != &[place.out, r] {
                return Err(mismatch(
                    b_name,
                    format!(
                        "shape {b_shape:?}, expected [{}, r = {r}] (the projection's output width)",
                        place.out
                    ),
                ));
            }
            if !targets.contains(&short) {
                targets.push(short);
            }
            parts.push(PartUpdate {
                place,
                rank: r,
                a: read_f32(&checkpoint, a_name)?,
                b: read_f32(&checkpoint, b_name)?,
            });
        }
        if parts.is_empty() {
            return Err(mismatch(
                ADAPTER_WEIGHTS,
                "holds no LoRA matrices for this model".into(),
            ));
        }
        let scale = if config.use_rslora {
            config.alpha / (config.rank as f64).sqrt()
        } else {
            config.alpha / config.rank as f64
        };
        let layers = fuse(plan, parts, scale as f32);
        targets.sort();
        Ok(Self {
            path: dir.to_path_buf(),
            rank: config.rank,
            alpha: config.alpha,
            scale,
            targets,
            layers,
        })
    }

    /// The update of `spec`, one of `plan`'s fused decoder projections, if this adapter has
    /// one: what a backend that merges adapters into its weights at load asks per linear.
    pub fn update_of(&self, plan: &WeightPlan, spec: &LinearSpec) -> Option<&LoraUpdate> {
        plan.layers.iter().enumerate().find_map(|(layer, l)| {
            let site = LoraSite::ALL.into_iter().find(|s| s.spec(l) == spec)?;
            self.layers.get(layer)?[site.index()].as_ref()
        })
    }

    /// Its widest rank over the sites: the columns it takes in a [`LoraStack`].
    ///
    /// [`LoraStack`]: crate::model::LoraStack
    pub fn width(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .flatten()
            .map(|u| u.rank)
            .max()
            .unwrap_or(0)
    }

    /// Parameters held (A and B of every site), for reports.
    pub fn num_params(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .flatten()
            .map(|u| u.a.len() + u.b.len())
            .sum()
    }
}

/// Every fused projection part of the plan's decoder layers, by module path
/// (`model.layers.3.self_attn.q_proj`).
fn part_places(plan: &WeightPlan) -> HashMap<String, PartPlace> {
    let mut places = HashMap::new();
    for (layer, l) in plan.layers.iter().enumerate() {
        for site in LoraSite::ALL {
            let spec = site.spec(l);
            let mut offset = 0;
            for part in &spec.parts {
                let module = part.name.strip_suffix(".weight").unwrap_or(&part.name);
                let out = part.shape[0];
                places.insert(
                    module.to_string(),
                    PartPlace {
                        layer,
                        site,
                        offset,
                        out,
                        inp: spec.inp,
                    },
                );
                offset += out;
            }
        }
    }
    places
}

/// `q_proj` of `model.layers.3.self_attn.q_proj`.
fn short_name(module: &str) -> &str {
    module.rsplit('.').next().unwrap_or(module)
}

/// The module path and matrix (0: A, 1: B) of a PEFT tensor name
/// (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, the adapter name
/// `.default` optionally left in).
fn lora_tensor(name: &str) -> Option<(String, usize)> {
    let rest = name.strip_prefix("base_model.model.").unwrap_or(name);
    let rest = rest.strip_suffix(".weight")?;
    let rest = rest.strip_suffix(".default").unwrap_or(rest);
    if let Some(m) = rest.strip_suffix(".lora_A") {
        Some((m.to_string(), 0))
    } else {
        rest.strip_suffix(".lora_B").map(|m| (m.to_string(), 1))
    }
}

/// Lays the parts out per layer and site: `A` rows stacked in part order, `B` block-diagonal.
fn fuse(plan: &WeightPlan, mut parts: Vec<PartUpdate>, scale: f32) -> Vec<[Option<LoraUpdate>; 4]> {
    parts.sort_by_key(|p| (p.place.layer, p.place.site.index(), p.place.offset));
    let mut layers: Vec<[Option<LoraUpdate>; 4]> =
        (0..plan.layers.len()).map(|_| Default::default()).collect();
    for (layer, l) in plan.layers.iter().enumerate() {
        for site in LoraSite::ALL {
            let mine: Vec<&PartUpdate> = parts
                .iter()
                .filter(|p| p.place.layer == layer && p.place.site == site)
                .collect();
            if mine.is_empty() {
                continue;
            }
            let spec = site.spec(l);
            let rank: usize = mine.iter().map(|p| p.rank).sum();
            let mut a = Vec::with_capacity(rank * spec.inp);
            let mut b = vec![0.0f32; spec.out * rank];
            let mut col = 0;
            for p in mine {
                a.extend_from_slice(&p.a);
                for row in 0..p.place.out {
                    let dst = (p.place.offset + row) * rank + col;
                    for c in 0..p.rank {
                        b[dst + c] = p.b[row * p.rank + c] * scale;
                    }
                }
                col += p.rank;
            }
            layers[layer][site.index()] = Some(LoraUpdate {
                rank,
                inp: spec.inp,
                out: spec.out,
                a,
                b,
            });
        }
    }
    layers
}

/// A tensor's data as f32 (F32, F16 or BF16 in the file).
fn read_f32(checkpoint: &Checkpoint, name: &str) -> Result<Vec<f32>, AdapterError> {
    let info = &checkpoint.tensors[name];
    let path = &checkpoint.files[info.file];
    let io = |source| ModelError::Io {
        path: path.clone(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    file.seek(SeekFrom::Start(info.begin)).map_err(io)?;
    let mut bytes = vec![0u8; (info.end - info.begin) as usize];
    file.read_exact(&mut bytes).map_err(io)?;
    Ok(match info.dtype.as_str() {
        "F32" => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        "BF16" => bytes
            .chunks_exact(2)
            .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
            .collect(),
        "F16" => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        other => {
            return Err(AdapterError::Mismatch {
                file: path.clone(),
                tensor: name.to_string(),
                reason: format!("dtype {other}; adapters load F32, F16 or BF16"),
            });
        }
    })
}

/// What `target_modules` says.
enum Targets {
    /// Module names (`q_proj`, ...).
    Named(Vec<String>),
    /// `"all-linear"`: every projection the tensors hold.
    AllLinear,
}

/// The fields of `adapter_config.json` that change the math, checked.
struct AdapterConfig {
    rank: usize,
    alpha: f64,
    use_rslora: bool,
    targets: Targets,
}

impl AdapterConfig {
    fn parse(path: &Path, text: &str) -> Result<Self, AdapterError> {
        let unsupported = |field: &'static str, reason: String| AdapterError::Unsupported {
            file: path.to_path_buf(),
            field,
            reason,
        };
        let invalid = |reason: String| {
            AdapterError::from(ModelError::InvalidConfig {
                file: path.to_path_buf(),
                reason,
            })
        };
        let json: Value =
            serde_json::from_str(text).map_err(|e| invalid(format!("not valid JSON: {e}")))?;
        let Some(map) = json.as_object() else {
            return Err(invalid("must be a JSON object".into()));
        };
        let get = |k: &str| map.get(k).filter(|v| !v.is_null());
        if let Some(t) = get("peft_type")
            && t.as_str() != Some("LORA")
        {
            return Err(unsupported(
                "peft_type",
                format!("{t}; only LORA adapters load"),
            ));
        }
        let rank = match get("r").and_then(Value::as_u64) {
            Some(r @ 1..=4096) => r as usize,
            _ => {
                return Err(invalid(format!(
                    "r must be a whole number in 1..=4096, got {}",
                    get("r").map_or("nothing".into(), Value::to_string)
                )));
            }
        };
        let alpha = match get("lora_alpha") {
            None => 8.0,
            Some(v) => match v.as_f64() {
                Some(a) if a.is_finite() => a,
                _ => {
                    return Err(invalid(format!(
                        "lora_alpha must be a finite number, got {v}"
                    )));
                }
            },
        };
        let flag = |k: &'static str| -> Result<bool, AdapterError> {
            match get(k) {
                None => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(v) => Err(invalid(format!("{k} must be true or false, got {v}"))),
            }
        };
        let use_rslora = flag("use_rslora")?;
        if flag("use_dora")? {
            return Err(unsupported(
                "use_dora",
                "DoRA adapters are not supported".into(),
            ));
        }
        if flag("fan_in_fan_out")? {
            return Err(unsupported(
                "fan_in_fan_out",
                "transposed (Conv1D) layouts are not supported".into(),
            ));
        }
        if let Some(b) = get("bias")
            && b.as_str() != Some("none")
        {
            return Err(unsupported(
                "bias",
                format!("{b}; only \"none\" (no trained biases)"),
            ));
        }
        let nonempty = |v: &Value| match v {
            Value::Array(a) => !a.is_empty(),
            Value::Object(o) => !o.is_empty(),
            _ => true,
        };
        for field in [
            "modules_to_save",
            "rank_pattern",
            "alpha_pattern",
            "layers_pattern",
        ] {
            if let Some(v) = get(field).filter(|v| nonempty(v)) {
                return Err(unsupported(field, format!("{v}: not supported")));
            }
        }
        let targets = match get("target_modules") {
            Some(Value::String(s)) if s == "all-linear" => Targets::AllLinear,
            Some(Value::String(s)) => {
                return Err(unsupported(
                    "target_modules",
                    format!("{s:?}: a regular expression; give the module names as a list"),
                ));
            }
            Some(Value::Array(items)) => Targets::Named(
                items
                    .iter()
                    .map(|v| {
                        v.as_str().map(str::to_string).ok_or_else(|| {
                            invalid(format!("target_modules must list strings, got {v}"))
                        })
                    })
                    .collect::<Result<_, _>>()?,
            ),
            other => {
                return Err(invalid(format!(
                    "target_modules must be a list of module names or \"all-linear\", got {}",
                    other.map_or("nothing".into(), Value::to_string)
                )));
            }
        };
        Ok(Self {
            rank,
            alpha,
            use_rslora,
            targets,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::ModelDir;
    use crate::model::checkpoint::tests::{Folder, tiny};

    /// Writes an F32 safetensors file of `tensors` (`name`, shape, data).
    pub(crate) fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, shape, values) in tensors {
            let begin = data.len();
            data.extend(values.iter().flat_map(|v| v.to_le_bytes()));
            header.insert(
                name.clone(),
                json!({"dtype": "F32", "shape": shape, "data_offsets": [begin, data.len()]}),
            );
        }
        let h = serde_json::to_vec(&header).unwrap();
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&h);
        out.extend_from_slice(&data);
        std::fs::write(path, out).unwrap();
    }

    fn values(n: usize, salt: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 * 0.37 + salt).sin()) * 0.1)
            .collect()
    }

    /// A PEFT folder for the tiny qwen2 model (hidden 64, q 64, k/v 32, inter 96) with rank
    /// `r` on `modules` of layer 0.
    fn adapter(dir: &Path, config: serde_json::Value, r: usize, modules: &[(&str, usize, usize)]) {
        std::fs::write(dir.join(ADAPTER_CONFIG), config.to_string()).unwrap();
        let mut tensors = Vec::new();
        for (k, &(module, out, inp)) in modules.iter().enumerate() {
            let base = format!("base_model.model.model.layers.0.{module}");
            tensors.push((
                format!("{base}.lora_A.weight"),
                vec![r, inp],
                values(r * inp, k as f32),
            ));
            tensors.push((
                format!("{base}.lora_B.weight"),
                vec![out, r],
                values(out * r, 9.0 + k as f32),
            ));
        }
        write_safetensors(&dir.join(ADAPTER_WEIGHTS), &tensors);
    }

    fn plan() -> WeightPlan {
        let dir = ModelDir::open(tiny("qwen2")).unwrap();
        WeightPlan::new(&dir.config, |n| dir.checkpoint.contains(n))
    }

    #[test]
    fn q_and_v_fuse_into_one_qkv_update_with_the_scale_in_b() {
        let folder = Folder::copy_of("qwen2");
        let config = json!({"peft_type": "LORA", "r": 2, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "bias": "none"});
        adapter(
            &folder.0,
            config,
            2,
            &[("self_attn.q_proj", 64, 64), ("self_attn.v_proj", 32, 64)],
        );
        let a = LoraAdapter::read(&folder.0, &plan()).unwrap();
        assert_eq!((a.rank, a.scale), (2, 4.0));
        assert_eq!(a.targets, ["q_proj", "v_proj"]);
        let u = a.layers[0][LoraSite::Qkv.index()].as_ref().unwrap();
        assert_eq!((u.rank, u.inp, u.out), (4, 64, 128));
        assert_eq!(&u.a[..128], &values(128, 0.0)[..]);
        assert_eq!(&u.a[128..], &values(128, 1.0)[..]);
        let (bq, bv) = (values(64 * 2, 9.0), values(32 * 2, 10.0));
        // q rows use columns 0..2, k rows nothing, v rows columns 2..4; scaled by 4.
        assert_eq!(
            &u.b[5 * 4..5 * 4 + 4],
            &[bq[10] * 4.0, bq[11] * 4.0, 0.0, 0.0]
        );
        assert!(u.b[70 * 4..71 * 4].iter().all(|&x| x == 0.0));
        assert_eq!(
            &u.b[100 * 4..101 * 4],
            &[0.0, 0.0, bv[8] * 4.0, bv[9] * 4.0]
        );
        assert!(a.layers[1].iter().all(Option::is_none));
        assert!(a.layers[0][LoraSite::Down.index()].is_none());
        // rsLoRA scales by alpha / sqrt(r).
        let config =
            json!({"r": 2, "lora_alpha": 8, "use_rslora": true, "target_modules": "all-linear"});
        std::fs::write(folder.0.join(ADAPTER_CONFIG), config.to_string()).unwrap();
        let a = LoraAdapter::read(&folder.0, &plan()).unwrap();
        assert!((a.scale - 8.0 / 2f64.sqrt()).abs() < 1e-12);
    }

    /// Merging adds `scale · B_part A_part` to each part's rows of the fused weight, nothing
    /// to the parts the adapter leaves alone; `update_of` finds a site by its linear.
    #[test]
    fn merging_adds_each_parts_scaled_product_to_its_rows() {
        let folder = Folder::copy_of("qwen2");
        let config = json!({"r": 2, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]});
        adapter(
            &folder.0,
            config,
            2,
            &[("self_attn.q_proj", 64, 64), ("self_attn.v_proj", 32, 64)],
        );
        let plan = plan();
        let a = LoraAdapter::read(&folder.0, &plan).unwrap();
        let u = a.update_of(&plan, &plan.layers[0].qkv).unwrap();
        assert!(a.update_of(&plan, &plan.layers[0].down).is_none());
        assert!(a.update_of(&plan, &plan.layers[1].qkv).is_none());
        let mut w = vec![1.0f32; 128 * 64];
        u.merge_into(&mut w);
        let (aq, av) = (values(2 * 64, 0.0), values(2 * 64, 1.0));
        let (bq, bv) = (values(64 * 2, 9.0), values(32 * 2, 10.0));
        let want = |b: &[f32], a: &[f32], row: usize, col: usize| {
            1.0 + 4.0 * (b[row * 2] * a[col] + b[row * 2 + 1] * a[64 + col])
        };
        for col in [0, 17, 63] {
            assert!((w[5 * 64 + col] - want(&bq, &aq, 5, col)).abs() < 1e-6);
            assert_eq!(w[70 * 64 + col], 1.0, "k rows stay");
            assert!((w[100 * 64 + col] - want(&bv, &av, 4, col)).abs() < 1e-6);
        }
    }

    #[test]
    fn bad_or_mismatched_adapters_are_typed_errors_naming_what() {
        let folder = Folder::copy_of("qwen2");
        let ok = json!({"r": 2, "lora_alpha": 4, "target_modules": ["down_proj"]});
        let down = [("mlp.down_proj", 64, 96)];
        type Case<'a> = (
            serde_json::Value,
            Vec<(&'a str, usize, usize)>,
            &'a [&'a str],
        );
        let cases: Vec<Case> = vec![
            (
                json!({"r": 2, "target_modules": ["c_attn"]}),
                down.to_vec(),
                &["c_attn", "q_proj"],
            ),
            (
                json!({"r": 2, "target_modules": ["down_proj"], "use_dora": true}),
                down.to_vec(),
                &["use_dora"],
            ),
            (
                json!({"r": 2, "target_modules": ["down_proj"], "bias": "all"}),
                down.to_vec(),
                &["bias"],
            ),
            (
                json!({"r": 0, "target_modules": ["down_proj"]}),
                down.to_vec(),
                &["r must be"],
            ),
            (
                json!({"r": 2, "target_modules": ".*proj"}),
                down.to_vec(),
                &["target_modules", "regular expression"],
            ),
            // A base with another width: the down projection's input is 96 here.
            (
                ok.clone(),
                vec![("mlp.down_proj", 64, 128)],
                &["lora_A", "[2, 128]", "[r = 2, 96]"],
            ),
            (
                ok.clone(),
                vec![("mlp.down_proj", 80, 96)],
                &["lora_B", "[80, 2]"],
            ),
            (
                ok.clone(),
                vec![("mlp.up_proj", 96, 64)],
                &["up_proj is not in target_modules"],
            ),
            (ok.clone(), vec![("mlp.nonsense", 96, 64)], &["nonsense"]),
        ];
        for (config, modules, words) in cases {
            adapter(&folder.0, config.clone(), 2, &modules);
            let err = LoraAdapter::read(&folder.0, &plan())
                .unwrap_err()
                .to_string();
            for w in words {
                assert!(
                    err.contains(w),
                    "{config} {modules:?}: {w:?} missing from: {err}"
                );
            }
        }
        std::fs::remove_file(folder.0.join(ADAPTER_WEIGHTS)).unwrap();
        let err = LoraAdapter::read(&folder.0, &plan())
            .unwrap_err()
            .to_string();
        assert!(err.contains(ADAPTER_WEIGHTS), "{err}");
    }
}
