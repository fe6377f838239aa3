//! The graph's interface, found once from its input and output names: Optimum's
//! "text-generation-with-past" layout.

use std::path::Path;

use ort::session::Session;
use ort::value::TensorElementType;

use crate::error::OnnxBackendError;

/// Element type of the KV tensors and logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KvType {
    F32,
    F16,
}

/// Typed names and facts of a decoder graph.
#[derive(Debug, Clone)]
pub(crate) struct GraphIo {
    pub num_layers: usize,
    pub has_position_ids: bool,
    pub kv_type: KvType,
    pub logits_type: KvType,
    pub past_key: Vec<String>,
    pub past_value: Vec<String>,
    pub present_key: Vec<String>,
    pub present_value: Vec<String>,
}

impl GraphIo {
    /// Reads the interface of `session`, checking the names Optimum uses.
    pub fn discover(session: &Session, path: &Path) -> Result<Self, OnnxBackendError> {
        let bad = |reason: String| OnnxBackendError::Graph {
            path: path.to_path_buf(),
            reason,
        };
        let inputs: Vec<&str> = session.inputs().iter().map(|o| o.name()).collect();
        let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        for required in ["input_ids", "attention_mask"] {
            if !inputs.contains(&required) {
                return Err(bad(format!(
                    "missing input `{required}` (inputs: {inputs:?})"
                )));
            }
        }
        if !outputs.contains(&"logits") {
            return Err(bad(format!(
                "missing output `logits` (outputs: {outputs:?})"
            )));
        }
        let num_layers = (0..)
            .take_while(|i| inputs.contains(&format!("past_key_values.{i}.key").as_str()))
            .count();
        if num_layers == 0 {
            return Err(bad(
                "no `past_key_values.N.key` inputs: export the graph with past (use_cache)".into(),
            ));
        }
        let names = |f: &dyn Fn(usize) -> String| (0..num_layers).map(f).collect::<Vec<_>>();
        let io = Self {
            num_layers,
            has_position_ids: inputs.contains(&"position_ids"),
            kv_type: element_type(session, "past_key_values.0.key", true).map_err(&bad)?,
            logits_type: element_type(session, "logits", false).map_err(&bad)?,
            past_key: names(&|i| format!("past_key_values.{i}.key")),
            past_value: names(&|i| format!("past_key_values.{i}.value")),
            present_key: names(&|i| format!("present.{i}.key")),
            present_value: names(&|i| format!("present.{i}.value")),
        };
        for name in io
            .past_value
            .iter()
            .chain(&io.present_key)
            .chain(&io.present_value)
        {
            if !inputs.contains(&name.as_str()) && !outputs.contains(&name.as_str()) {
                return Err(bad(format!("missing `{name}`")));
            }
        }
        Ok(io)
    }
}

fn element_type(session: &Session, name: &str, input: bool) -> Result<KvType, String> {
    let outlets = if input {
        session.inputs()
    } else {
        session.outputs()
    };
    let outlet = outlets
        .iter()
        .find(|o| o.name() == name)
        .ok_or_else(|| format!("missing `{name}`"))?;
    match outlet.dtype().tensor_type() {
        Some(TensorElementType::Float32) => Ok(KvType::F32),
        Some(TensorElementType::Float16) => Ok(KvType::F16),
        other => Err(format!(
            "`{name}` has element type {other:?}; expected float32 or float16"
        )),
    }
}
