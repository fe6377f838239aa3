//! The graph being built: nodes in topological order (each is appended after its inputs exist),
//! initializers, deduplicated constants, and the plan of the external data file.

use std::collections::HashMap;
use std::sync::Arc;

use infermux_core::model::LoraUpdate;

use super::proto::{AttrValue, Attribute, ElemType, Node, Tensor, TensorData};

/// External tensors at least this large start on a page boundary, so that ONNX Runtime can map
/// them instead of copying (smaller ones are only 16-byte aligned, to keep tiny models tiny).
const PAGE: u64 = 4096;

/// Where the values of an external initializer come from.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Source {
    /// Checkpoint tensors concatenated along their first dimension (`[rows_i, cols]` each, or
    /// vectors with `cols == 1`); with `transpose` the `[Σ rows_i, cols]` result is stored as
    /// `[cols, Σ rows_i]` (a projection weight `[out, in]` as MatMul's `[in, out]`).
    Checkpoint {
        parts: Vec<String>,
        cols: usize,
        transpose: bool,
    },
    /// A projection's checkpoint parts (as [`Source::Checkpoint`] with `transpose`) with a
    /// LoRA adapter's `ΔW = B A` added before the transpose: an adapter merged at export.
    Merged {
        parts: Vec<String>,
        update: Arc<LoraUpdate>,
    },
    /// Values computed by the exporter (RoPE tables).
    Values(Vec<f32>),
}

/// One tensor of the external data file: its place and its values.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DataJob {
    pub name: String,
    pub offset: u64,
    pub elements: usize,
    pub source: Source,
}

/// Nodes and initializers of the graph being recorded.
pub(crate) struct Graph {
    /// Element type of weights and activations (f32 or f16).
    pub float: ElemType,
    pub nodes: Vec<Node>,
    pub initializers: Vec<Tensor>,
    /// The external data file's tensors, in file order.
    pub jobs: Vec<DataJob>,
    data_len: u64,
    consts: HashMap<(ElemType, Vec<i64>, Vec<u8>), String>,
    count: usize,
}

/// An INT attribute.
pub(crate) fn int(name: &'static str, v: i64) -> Attribute {
    Attribute {
        name,
        value: AttrValue::Int(v),
    }
}

/// An INTS attribute.
pub(crate) fn ints(name: &'static str, v: &[i64]) -> Attribute {
    Attribute {
        name,
        value: AttrValue::Ints(v.to_vec()),
    }
}

impl Graph {
    pub fn new(float: ElemType) -> Self {
        Self {
            float,
            nodes: Vec::new(),
            initializers: Vec::new(),
            jobs: Vec::new(),
            data_len: 0,
            consts: HashMap::new(),
            count: 0,
        }
    }

    /// Size of the external data file.
    pub fn data_len(&self) -> u64 {
        self.data_len
    }

    /// An initializer of the model's float type stored in the external data file.
    pub fn external(&mut self, name: String, dims: &[usize], source: Source) -> String {
        let elements: usize = dims.iter().product();
        let length = (elements * self.float.size()) as u64;
        let align = if length >= PAGE { PAGE } else { 16 };
        let offset = self.data_len.div_ceil(align) * align;
        self.data_len = offset + length;
        self.initializers.push(Tensor {
            name: name.clone(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            elem: self.float,
            data: TensorData::External { offset, length },
        });
        self.jobs.push(DataJob {
            name: name.clone(),
            offset,
            elements,
            source,
        });
        name
    }

    /// An inline constant; equal constants share one initializer.
    fn constant(&mut self, elem: ElemType, dims: Vec<i64>, bytes: Vec<u8>) -> String {
        let key = (elem, dims, bytes);
        if let Some(name) = self.consts.get(&key) {
            return name.clone();
        }
        let name = format!("const_{}", self.consts.len());
        self.initializers.push(Tensor {
            name: name.clone(),
            dims: key.1.clone(),
            elem,
            data: TensorData::Raw(key.2.clone()),
        });
        self.consts.insert(key, name.clone());
        name
    }

    /// A 1-D int64 constant (shapes, axes, split sizes).
    pub fn i64s(&mut self, values: &[i64]) -> String {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.constant(ElemType::Int64, vec![values.len() as i64], bytes)
    }

    /// A scalar int64 constant.
    pub fn i64_scalar(&mut self, value: i64) -> String {
        self.constant(ElemType::Int64, vec![], value.to_le_bytes().to_vec())
    }

    /// A scalar f32 constant.
    pub fn f32_scalar(&mut self, value: f32) -> String {
        self.constant(ElemType::Float, vec![], value.to_le_bytes().to_vec())
    }

    /// A scalar constant of the model's float type.
    pub fn float_scalar(&mut self, value: f32) -> String {
        let bytes = match self.float {
            ElemType::Float16 => half::f16::from_f32(value).to_le_bytes().to_vec(),
            _ => value.to_le_bytes().to_vec(),
        };
        self.constant(self.float, vec![], bytes)
    }

    /// Appends a node with one output, named after the node.
    pub fn op(
        &mut self,
        op_type: &'static str,
        scope: &str,
        inputs: &[&str],
        attributes: Vec<Attribute>,
    ) -> String {
        self.op_n(op_type, scope, inputs, 1, attributes).remove(0)
    }

    /// Appends a node with `n` outputs, named `<node>:<k>` when there are several.
    pub fn op_n(
        &mut self,
        op_type: &'static str,
        scope: &str,
        inputs: &[&str],
        n: usize,
        attributes: Vec<Attribute>,
    ) -> Vec<String> {
        self.count += 1;
        let name = format!("/{scope}/{op_type}_{}", self.count);
        let outputs = if n == 1 {
            vec![name.clone()]
        } else {
            (0..n).map(|k| format!("{name}:{k}")).collect()
        };
        self.push(op_type, name, inputs, outputs.clone(), attributes);
        outputs
    }

    /// Appends a node whose single output has a given name (a graph output).
    pub fn op_to(
        &mut self,
        op_type: &'static str,
        scope: &str,
        inputs: &[&str],
        output: &str,
        attributes: Vec<Attribute>,
    ) -> String {
        self.count += 1;
        let name = format!("/{scope}/{op_type}_{}", self.count);
        self.push(op_type, name, inputs, vec![output.to_string()], attributes);
        output.to_string()
    }

    fn push(
        &mut self,
        op_type: &'static str,
        name: String,
        inputs: &[&str],
        outputs: Vec<String>,
        attributes: Vec<Attribute>,
    ) {
        self.nodes.push(Node {
            op_type,
            name,
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs,
            attributes,
        });
    }

    /// `Cast` to f32 when the model's float type is not f32 (norms and softmax run in f32).
    pub fn cast_to_f32(&mut self, x: &str, scope: &str) -> String {
        if self.float == ElemType::Float {
            return x.to_string();
        }
        self.op("Cast", scope, &[x], vec![int("to", ElemType::Float as i64)])
    }

    /// `Cast` back from f32 to the model's float type.
    pub fn cast_from_f32(&mut self, x: &str, scope: &str) -> String {
        if self.float == ElemType::Float {
            return x.to_string();
        }
        let to = self.float as i64;
        self.op("Cast", scope, &[x], vec![int("to", to)])
    }

    /// Renames the output `old` of the node that produces it (the last value of the forward
    /// becomes the graph output `logits`); no other node may read `old` yet.
    pub fn rename_output(&mut self, old: &str, new: &str) -> bool {
        let reads = self.nodes.iter().any(|n| n.inputs.iter().any(|i| i == old));
        let Some(slot) = self
            .nodes
            .iter_mut()
            .rev()
            .find_map(|n| n.outputs.iter_mut().find(|o| *o == old))
        else {
            return false;
        };
        if reads {
            return false;
        }
        *slot = new.to_string();
        true
    }
}
