//! Guided decoding for infermux through llguidance (being built).
