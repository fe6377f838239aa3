//! infermux backend on onnx: implemented in a later milestone; this crate reserves its place.
