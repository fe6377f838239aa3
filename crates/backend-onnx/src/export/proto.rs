//! The few ONNX protobuf messages an exported decoder needs, and their wire encoding.
//!
//! Why hand-written: the exporter writes twelve message types (model, graph, node, attribute,
//! tensor, string entry, value info, type, tensor type, shape, dimension, opset id) and never
//! reads one; their encoding is the ~150 lines below over the protobuf wire format (varints and
//! length-delimited fields). `prost` with code generated from `onnx.proto` would add prost and
//! prost-derive to the build (bytes is already in the lock file), plus prost-build, prost-types,
//! petgraph, multimap and fixedbitset and a `protoc` binary at build time, to generate all 28
//! messages of the schema; the exporter would still need the same glue to fill them. Field
//! numbers below are those of `onnx/onnx.proto`; repeated scalars are written unpacked, as its
//! proto2 declarations of `dims` and `ints` say, which every protobuf parser accepts.

/// Element types used by the exported graph (`TensorProto.DataType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ElemType {
    Float = 1,
    Int64 = 7,
    Bool = 9,
    Float16 = 10,
}

impl ElemType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::Float => 4,
            Self::Int64 => 8,
            Self::Bool => 1,
            Self::Float16 => 2,
        }
    }
}

/// A node attribute value (`AttributeProto` of type INT or INTS: the only kinds the graph's
/// ops take).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum AttrValue {
    Int(i64),
    Ints(Vec<i64>),
}

/// `AttributeProto`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Attribute {
    pub name: &'static str,
    pub value: AttrValue,
}

/// `NodeProto` of the default domain.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Node {
    pub op_type: &'static str,
    pub name: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attributes: Vec<Attribute>,
}

/// Where a tensor's bytes are.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum TensorData {
    /// Inline little-endian `raw_data`.
    Raw(Vec<u8>),
    /// In the external data file, at `offset` for `length` bytes.
    External { offset: u64, length: u64 },
}

/// `TensorProto` (an initializer).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Tensor {
    pub name: String,
    pub dims: Vec<i64>,
    pub elem: ElemType,
    pub data: TensorData,
}

/// One dimension of a graph input or output.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Dim {
    Fixed(i64),
    Symbolic(String),
}

/// `ValueInfoProto` of a tensor graph input or output.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ValueInfo {
    pub name: String,
    pub elem: ElemType,
    pub dims: Vec<Dim>,
}

/// `ModelProto` with one graph and one opset of the default domain.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Model {
    pub ir_version: i64,
    pub opset: i64,
    pub producer_name: String,
    pub producer_version: String,
    pub graph_name: String,
    pub nodes: Vec<Node>,
    pub initializers: Vec<Tensor>,
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
    /// File name of the external data, relative to the graph file.
    pub data_file: String,
}

/// A protobuf message being written.
#[derive(Default)]
struct Buf(Vec<u8>);

const VARINT: u32 = 0;
const LEN: u32 = 2;

impl Buf {
    fn raw_varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn tag(&mut self, field: u32, wire: u32) {
        self.raw_varint(u64::from(field << 3 | wire));
    }

    /// An `int32`/`int64`/enum field (negative values take ten bytes, as protobuf specifies).
    fn int(&mut self, field: u32, v: i64) {
        self.tag(field, VARINT);
        self.raw_varint(v as u64);
    }

    fn bytes(&mut self, field: u32, v: &[u8]) {
        self.tag(field, LEN);
        self.raw_varint(v.len() as u64);
        self.0.extend_from_slice(v);
    }

    fn string(&mut self, field: u32, v: &str) {
        self.bytes(field, v.as_bytes());
    }

    fn message(&mut self, field: u32, write: impl FnOnce(&mut Buf)) {
        let mut inner = Buf::default();
        write(&mut inner);
        self.bytes(field, &inner.0);
    }
}

fn string_entry(b: &mut Buf, field: u32, key: &str, value: &str) {
    b.message(field, |e| {
        e.string(1, key);
        e.string(2, value);
    });
}

fn attribute(b: &mut Buf, a: &Attribute) {
    // AttributeProto: name = 1, i = 3, ints = 8, type = 20 (INT = 2, INTS = 7).
    b.string(1, a.name);
    match &a.value {
        AttrValue::Int(i) => {
            b.int(3, *i);
            b.int(20, 2);
        }
        AttrValue::Ints(v) => {
            for &i in v {
                b.int(8, i);
            }
            b.int(20, 7);
        }
    }
}

fn node(b: &mut Buf, n: &Node) {
    // NodeProto: input = 1, output = 2, name = 3, op_type = 4, attribute = 5.
    for i in &n.inputs {
        b.string(1, i);
    }
    for o in &n.outputs {
        b.string(2, o);
    }
    b.string(3, &n.name);
    b.string(4, n.op_type);
    for a in &n.attributes {
        b.message(5, |m| attribute(m, a));
    }
}

fn tensor(b: &mut Buf, t: &Tensor, data_file: &str) {
    // TensorProto: dims = 1, data_type = 2, name = 8, raw_data = 9, external_data = 13,
    // data_location = 14 (EXTERNAL = 1).
    for &d in &t.dims {
        b.int(1, d);
    }
    b.int(2, t.elem as i64);
    b.string(8, &t.name);
    match &t.data {
        TensorData::Raw(bytes) => b.bytes(9, bytes),
        TensorData::External { offset, length } => {
            string_entry(b, 13, "location", data_file);
            string_entry(b, 13, "offset", &offset.to_string());
            string_entry(b, 13, "length", &length.to_string());
            b.int(14, 1);
        }
    }
}

fn value_info(b: &mut Buf, v: &ValueInfo) {
    // ValueInfoProto: name = 1, type = 2; TypeProto: tensor_type = 1; TypeProto.Tensor:
    // elem_type = 1, shape = 2; TensorShapeProto: dim = 1; Dimension: dim_value = 1,
    // dim_param = 2.
    b.string(1, &v.name);
    b.message(2, |ty| {
        ty.message(1, |tt| {
            tt.int(1, v.elem as i64);
            tt.message(2, |shape| {
                for d in &v.dims {
                    shape.message(1, |dim| match d {
                        Dim::Fixed(n) => dim.int(1, *n),
                        Dim::Symbolic(s) => dim.string(2, s),
                    });
                }
            });
        });
    });
}

/// The serialized `ModelProto`.
pub(crate) fn encode(m: &Model) -> Vec<u8> {
    let mut b = Buf::default();
    // ModelProto: ir_version = 1, producer_name = 2, producer_version = 3, graph = 7,
    // opset_import = 8.
    b.int(1, m.ir_version);
    b.string(2, &m.producer_name);
    b.string(3, &m.producer_version);
    b.message(7, |g| {
        // GraphProto: node = 1, name = 2, initializer = 5, input = 11, output = 12.
        for n in &m.nodes {
            g.message(1, |x| node(x, n));
        }
        g.string(2, &m.graph_name);
        for t in &m.initializers {
            g.message(5, |x| tensor(x, t, &m.data_file));
        }
        for v in &m.inputs {
            g.message(11, |x| value_info(x, v));
        }
        for v in &m.outputs {
            g.message(12, |x| value_info(x, v));
        }
    });
    b.message(8, |o| {
        // OperatorSetIdProto: domain = 1 (the default domain ""), version = 2.
        o.string(1, "");
        o.int(2, m.opset);
    });
    b.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_fields_follow_the_wire_format() {
        let mut b = Buf::default();
        b.int(1, 150);
        assert_eq!(b.0, [0x08, 0x96, 0x01]);
        let mut b = Buf::default();
        b.int(3, -1);
        assert_eq!(
            b.0.len(),
            11,
            "negative int64 is a ten-byte varint after the tag"
        );
        assert_eq!(&b.0[..2], &[0x18, 0xff]);
        assert_eq!(b.0[10], 0x01);
        let mut b = Buf::default();
        b.string(2, "testing");
        assert_eq!(b.0, b"\x12\x07testing");
        let mut b = Buf::default();
        b.message(20, |m| m.int(1, 1));
        assert_eq!(b.0, [0xa2, 0x01, 0x02, 0x08, 0x01]);
    }

    #[test]
    fn an_attribute_carries_its_type() {
        let mut b = Buf::default();
        attribute(
            &mut b,
            &Attribute {
                name: "perm",
                value: AttrValue::Ints(vec![0, 2]),
            },
        );
        // name, ints 0, ints 2, type INTS (field 20 → tag 0xa0 0x01).
        assert_eq!(b.0, b"\x0a\x04perm\x40\x00\x40\x02\xa0\x01\x07");
    }
}
