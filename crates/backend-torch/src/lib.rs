//! infermux backend on torch: implemented in a later milestone; this crate reserves its place.
