//! The subset of the ONNX protobuf schema (`onnx.proto`, proto2) that marengo writes and
//! rewrites, as hand-written `prost` messages.
//!
//! Why not a generated crate or tract's own: the exporter must build without tract, and the
//! engine must edit a graph (FP8 `DequantizeLinear`→`MatMul` become marengo ops) *before* tract
//! parses it, because tract has no FP8 datum type. Field numbers and wire types are exactly those
//! of `onnx.proto`; fields outside this subset are skipped when decoding and therefore dropped
//! when re-encoding. proto2 `optional` scalars whose presence matters (attribute values) are
//! `Option`s so that a zero is still written; repeated scalars keep onnx.proto's packing.

use prost::Message;

use crate::graph::{EXTERNAL_LENGTH, EXTERNAL_LOCATION, EXTERNAL_OFFSET};
use crate::manifest::TensorDtype;

/// `TensorProto.DataType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum DataType {
    Undefined = 0,
    Float = 1,
    Uint8 = 2,
    Int8 = 3,
    Uint16 = 4,
    Int16 = 5,
    Int32 = 6,
    Int64 = 7,
    String = 8,
    Bool = 9,
    Float16 = 10,
    Double = 11,
    Uint32 = 12,
    Uint64 = 13,
    Complex64 = 14,
    Complex128 = 15,
    Bfloat16 = 16,
    Float8e4m3fn = 17,
    Float8e4m3fnuz = 18,
    Float8e5m2 = 19,
    Float8e5m2fnuz = 20,
    Uint4 = 21,
    Int4 = 22,
    Float4e2m1 = 23,
}

/// `TensorProto.DataLocation`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum DataLocation {
    Default = 0,
    External = 1,
}

/// `AttributeProto.AttributeType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum AttributeType {
    Undefined = 0,
    Float = 1,
    Int = 2,
    String = 3,
    Tensor = 4,
    Graph = 5,
    Floats = 6,
    Ints = 7,
    Strings = 8,
    Tensors = 9,
    Graphs = 10,
    SparseTensor = 11,
    SparseTensors = 12,
    TypeProto = 13,
    TypeProtos = 14,
}

/// `ModelProto`: the file.
#[derive(Clone, PartialEq, Message)]
pub struct ModelProto {
    #[prost(int64, tag = "1")]
    pub ir_version: i64,
    #[prost(message, repeated, tag = "8")]
    pub opset_import: Vec<OperatorSetIdProto>,
    #[prost(string, tag = "2")]
    pub producer_name: String,
    #[prost(string, tag = "3")]
    pub producer_version: String,
    #[prost(string, tag = "4")]
    pub domain: String,
    #[prost(int64, tag = "5")]
    pub model_version: i64,
    #[prost(string, tag = "6")]
    pub doc_string: String,
    #[prost(message, optional, tag = "7")]
    pub graph: Option<GraphProto>,
    #[prost(message, repeated, tag = "14")]
    pub metadata_props: Vec<StringStringEntryProto>,
}

/// `OperatorSetIdProto`: an imported opset; the empty domain is the default `ai.onnx`.
#[derive(Clone, PartialEq, Message)]
pub struct OperatorSetIdProto {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(int64, tag = "2")]
    pub version: i64,
}

/// `StringStringEntryProto`: ONNX's map entry (external data keys, metadata).
#[derive(Clone, PartialEq, Message)]
pub struct StringStringEntryProto {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `GraphProto`.
#[derive(Clone, PartialEq, Message)]
pub struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    pub node: Vec<NodeProto>,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(message, repeated, tag = "5")]
    pub initializer: Vec<TensorProto>,
    #[prost(string, tag = "10")]
    pub doc_string: String,
    #[prost(message, repeated, tag = "11")]
    pub input: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    pub output: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "13")]
    pub value_info: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "16")]
    pub metadata_props: Vec<StringStringEntryProto>,
}

/// `NodeProto`.
#[derive(Clone, PartialEq, Message)]
pub struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    pub input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub output: Vec<String>,
    #[prost(string, tag = "3")]
    pub name: String,
    #[prost(string, tag = "4")]
    pub op_type: String,
    #[prost(string, tag = "7")]
    pub domain: String,
    #[prost(message, repeated, tag = "5")]
    pub attribute: Vec<AttributeProto>,
    #[prost(string, tag = "6")]
    pub doc_string: String,
    #[prost(message, repeated, tag = "9")]
    pub metadata_props: Vec<StringStringEntryProto>,
}

/// `AttributeProto`. Exactly one value field is set, named by `r#type`.
#[derive(Clone, PartialEq, Message)]
pub struct AttributeProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "21")]
    pub ref_attr_name: String,
    #[prost(string, tag = "13")]
    pub doc_string: String,
    #[prost(enumeration = "AttributeType", tag = "20")]
    pub r#type: i32,
    #[prost(float, optional, tag = "2")]
    pub f: Option<f32>,
    #[prost(int64, optional, tag = "3")]
    pub i: Option<i64>,
    #[prost(bytes = "vec", optional, tag = "4")]
    pub s: Option<Vec<u8>>,
    #[prost(message, optional, tag = "5")]
    pub t: Option<TensorProto>,
    #[prost(message, optional, tag = "6")]
    pub g: Option<GraphProto>,
    #[prost(message, optional, tag = "14")]
    pub tp: Option<TypeProto>,
    #[prost(float, repeated, packed = "false", tag = "7")]
    pub floats: Vec<f32>,
    #[prost(int64, repeated, packed = "false", tag = "8")]
    pub ints: Vec<i64>,
    #[prost(bytes = "vec", repeated, tag = "9")]
    pub strings: Vec<Vec<u8>>,
    #[prost(message, repeated, tag = "10")]
    pub tensors: Vec<TensorProto>,
    #[prost(message, repeated, tag = "11")]
    pub graphs: Vec<GraphProto>,
    #[prost(message, repeated, tag = "15")]
    pub type_protos: Vec<TypeProto>,
}

/// `ValueInfoProto`: a graph input, output or annotated intermediate.
#[derive(Clone, PartialEq, Message)]
pub struct ValueInfoProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "2")]
    pub r#type: Option<TypeProto>,
    #[prost(string, tag = "3")]
    pub doc_string: String,
    #[prost(message, repeated, tag = "4")]
    pub metadata_props: Vec<StringStringEntryProto>,
}

/// `TypeProto`; only tensor types are modelled.
#[derive(Clone, PartialEq, Message)]
pub struct TypeProto {
    #[prost(oneof = "type_proto::Value", tags = "1")]
    pub value: Option<type_proto::Value>,
    #[prost(string, tag = "6")]
    pub denotation: String,
}

/// Nested messages of [`TypeProto`].
pub mod type_proto {
    /// `TypeProto.Tensor`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Tensor {
        #[prost(enumeration = "super::DataType", tag = "1")]
        pub elem_type: i32,
        #[prost(message, optional, tag = "2")]
        pub shape: Option<super::TensorShapeProto>,
    }

    /// `TypeProto.value`.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Value {
        #[prost(message, tag = "1")]
        TensorType(Tensor),
    }
}

/// `TensorShapeProto`.
#[derive(Clone, PartialEq, Message)]
pub struct TensorShapeProto {
    #[prost(message, repeated, tag = "1")]
    pub dim: Vec<tensor_shape_proto::Dimension>,
}

/// Nested messages of [`TensorShapeProto`].
pub mod tensor_shape_proto {
    /// `TensorShapeProto.Dimension`: a fixed size or a named symbol.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Dimension {
        #[prost(oneof = "dimension::Value", tags = "1, 2")]
        pub value: Option<dimension::Value>,
        #[prost(string, tag = "3")]
        pub denotation: String,
    }

    /// Nested messages of [`Dimension`].
    pub mod dimension {
        /// `Dimension.value`.
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Value {
            #[prost(int64, tag = "1")]
            DimValue(i64),
            #[prost(string, tag = "2")]
            DimParam(String),
        }
    }
}

/// `TensorProto`: an initializer, inline (`raw_data`, typed fields) or external.
#[derive(Clone, PartialEq, Message)]
pub struct TensorProto {
    #[prost(int64, repeated, packed = "false", tag = "1")]
    pub dims: Vec<i64>,
    #[prost(enumeration = "DataType", tag = "2")]
    pub data_type: i32,
    #[prost(float, repeated, tag = "4")]
    pub float_data: Vec<f32>,
    #[prost(int32, repeated, tag = "5")]
    pub int32_data: Vec<i32>,
    #[prost(bytes = "vec", repeated, tag = "6")]
    pub string_data: Vec<Vec<u8>>,
    #[prost(int64, repeated, tag = "7")]
    pub int64_data: Vec<i64>,
    #[prost(string, tag = "8")]
    pub name: String,
    #[prost(string, tag = "12")]
    pub doc_string: String,
    #[prost(bytes = "vec", tag = "9")]
    pub raw_data: Vec<u8>,
    #[prost(message, repeated, tag = "13")]
    pub external_data: Vec<StringStringEntryProto>,
    #[prost(enumeration = "DataLocation", tag = "14")]
    pub data_location: i32,
    #[prost(double, repeated, tag = "10")]
    pub double_data: Vec<f64>,
    #[prost(uint64, repeated, tag = "11")]
    pub uint64_data: Vec<u64>,
    #[prost(message, repeated, tag = "16")]
    pub metadata_props: Vec<StringStringEntryProto>,
}

impl From<TensorDtype> for DataType {
    fn from(dtype: TensorDtype) -> Self {
        match dtype {
            TensorDtype::Fp8E4m3fn => DataType::Float8e4m3fn,
            TensorDtype::F16 => DataType::Float16,
            TensorDtype::F32 => DataType::Float,
        }
    }
}

/// Where an external tensor's bytes are, as its `external_data` entries say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalLocation {
    /// File name relative to the model file.
    pub location: String,
    pub offset: u64,
    /// `None` when the entry is absent: the data runs to the end of the file.
    pub length: Option<u64>,
}

/// Why an initializer's `external_data` cannot be read, or is not what the tensor table says.
#[derive(Debug, thiserror::Error)]
pub enum ExternalDataError {
    #[error("tensor {tensor}: external_data has no `location`")]
    NoLocation { tensor: String },
    #[error("tensor {tensor}: external_data `{key}` = {value:?} is not a byte count")]
    BadNumber {
        tensor: String,
        key: String,
        value: String,
    },
    #[error("tensor {tensor}: stored outside the graph but not listed in the tensor table")]
    NotInTable { tensor: String },
    #[error("tensor {tensor}: the graph says {what} {graph}, the tensor table {table}")]
    Disagrees {
        tensor: String,
        what: &'static str,
        graph: String,
        table: String,
    },
}

impl ExternalLocation {
    /// Reads the `external_data` entries (key, value) of the initializer `tensor`.
    pub fn from_entries<'a>(
        tensor: &str,
        entries: impl IntoIterator<Item = (&'a str, &'a str)> + Clone,
    ) -> Result<Self, ExternalDataError> {
        let get = |key: &str| {
            entries
                .clone()
                .into_iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v)
        };
        let number = |key: &str| -> Result<Option<u64>, ExternalDataError> {
            get(key)
                .map(|value| {
                    value.parse().map_err(|_| ExternalDataError::BadNumber {
                        tensor: tensor.to_owned(),
                        key: key.to_owned(),
                        value: value.to_owned(),
                    })
                })
                .transpose()
        };
        let location = get(EXTERNAL_LOCATION).ok_or_else(|| ExternalDataError::NoLocation {
            tensor: tensor.to_owned(),
        })?;
        Ok(ExternalLocation {
            location: location.to_owned(),
            offset: number(EXTERNAL_OFFSET)?.unwrap_or(0),
            length: number(EXTERNAL_LENGTH)?,
        })
    }
}

impl TensorProto {
    /// An initializer whose bytes live at `offset..offset+length` of `location`.
    pub fn external(
        name: &str,
        data_type: DataType,
        dims: &[i64],
        location: &str,
        offset: u64,
        length: u64,
    ) -> Self {
        let entry = |key: &str, value: String| StringStringEntryProto {
            key: key.to_owned(),
            value,
        };
        TensorProto {
            name: name.to_owned(),
            data_type: data_type as i32,
            dims: dims.to_vec(),
            data_location: DataLocation::External as i32,
            external_data: vec![
                entry(EXTERNAL_LOCATION, location.to_owned()),
                entry(EXTERNAL_OFFSET, offset.to_string()),
                entry(EXTERNAL_LENGTH, length.to_string()),
            ],
            ..Default::default()
        }
    }

    /// The external location, or `None` for a tensor stored inline.
    pub fn external_location(&self) -> Result<Option<ExternalLocation>, ExternalDataError> {
        if self.data_location != DataLocation::External as i32 {
            return Ok(None);
        }
        let entries = self
            .external_data
            .iter()
            .map(|e| (e.key.as_str(), e.value.as_str()));
        ExternalLocation::from_entries(&self.name, entries).map(Some)
    }
}

impl AttributeProto {
    /// An `INT` attribute.
    pub fn int(name: &str, value: i64) -> Self {
        AttributeProto {
            name: name.to_owned(),
            r#type: AttributeType::Int as i32,
            i: Some(value),
            ..Default::default()
        }
    }

    /// A `FLOAT` attribute.
    pub fn float(name: &str, value: f32) -> Self {
        AttributeProto {
            name: name.to_owned(),
            r#type: AttributeType::Float as i32,
            f: Some(value),
            ..Default::default()
        }
    }

    /// An `INTS` attribute.
    pub fn ints(name: &str, values: &[i64]) -> Self {
        AttributeProto {
            name: name.to_owned(),
            r#type: AttributeType::Ints as i32,
            ints: values.to_vec(),
            ..Default::default()
        }
    }

    /// A `TENSOR` attribute (e.g. `Constant`'s `value`).
    pub fn tensor(name: &str, value: TensorProto) -> Self {
        AttributeProto {
            name: name.to_owned(),
            r#type: AttributeType::Tensor as i32,
            t: Some(value),
            ..Default::default()
        }
    }
}

/// One dimension of a [`ValueInfoProto::tensor`] shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Fixed(i64),
    Symbol(String),
}

impl ValueInfoProto {
    /// A tensor value of element type `elem_type` and shape `dims`.
    pub fn tensor(name: &str, elem_type: DataType, dims: &[Dim]) -> Self {
        use tensor_shape_proto::Dimension;
        use tensor_shape_proto::dimension::Value;
        let dim = dims
            .iter()
            .map(|d| Dimension {
                value: Some(match d {
                    Dim::Fixed(n) => Value::DimValue(*n),
                    Dim::Symbol(s) => Value::DimParam(s.clone()),
                }),
                denotation: String::new(),
            })
            .collect();
        ValueInfoProto {
            name: name.to_owned(),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: elem_type as i32,
                    shape: Some(TensorShapeProto { dim }),
                })),
                denotation: String::new(),
            }),
            ..Default::default()
        }
    }

    /// Element type and dimensions, when this is a tensor with a shape.
    pub fn tensor_shape(&self) -> Option<(i32, Vec<Dim>)> {
        use tensor_shape_proto::dimension::Value;
        let type_proto::Value::TensorType(tensor) = self.r#type.as_ref()?.value.as_ref()?;
        let dims = tensor
            .shape
            .as_ref()?
            .dim
            .iter()
            .map(|d| match &d.value {
                Some(Value::DimValue(n)) => Dim::Fixed(*n),
                Some(Value::DimParam(s)) => Dim::Symbol(s.clone()),
                None => Dim::Symbol(String::new()),
            })
            .collect();
        Some((tensor.elem_type, dims))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes of a minimal ModelProto as the reference protobuf implementation writes them
    /// (fields in tag order):
    /// ir_version 10, opset 23, one Transpose node with `perm` [1, 0] (unpacked ints), one
    /// external FLOAT8E4M3FN initializer and a symbolic input dimension.
    fn reference_model_bytes() -> Vec<u8> {
        fn field(tag: u32, wire: u8, payload: &[u8]) -> Vec<u8> {
            let mut out = Vec::new();
            prost::encoding::encode_varint(u64::from(tag << 3 | u32::from(wire)), &mut out);
            if wire == 2 {
                prost::encoding::encode_varint(payload.len() as u64, &mut out);
            }
            out.extend_from_slice(payload);
            out
        }
        fn varint(v: u64) -> Vec<u8> {
            let mut out = Vec::new();
            prost::encoding::encode_varint(v, &mut out);
            out
        }
        let attr = [
            field(1, 2, b"perm"),
            field(8, 0, &varint(1)),
            field(8, 0, &varint(0)),
            field(20, 0, &varint(7)),
        ]
        .concat();
        let node = [
            field(1, 2, b"w"),
            field(2, 2, b"wt"),
            field(4, 2, b"Transpose"),
            field(5, 2, &attr),
        ]
        .concat();
        let entry = |k: &[u8], v: &[u8]| [field(1, 2, k), field(2, 2, v)].concat();
        let init = [
            field(1, 0, &varint(3)),
            field(1, 0, &varint(2)),
            field(2, 0, &varint(17)),
            field(8, 2, b"w"),
            field(13, 2, &entry(b"location", b"model.weights")),
            field(13, 2, &entry(b"offset", b"4096")),
            field(13, 2, &entry(b"length", b"6")),
            field(14, 0, &varint(1)),
        ]
        .concat();
        let dim = field(2, 2, b"batch");
        let dim_fixed = field(1, 0, &varint(0));
        let shape = [field(1, 2, &dim), field(1, 2, &dim_fixed)].concat();
        let tensor_type = [field(1, 0, &varint(1)), field(2, 2, &shape)].concat();
        let type_proto = field(1, 2, &tensor_type);
        let input = [field(1, 2, b"x"), field(2, 2, &type_proto)].concat();
        let graph = [
            field(1, 2, &node),
            field(2, 2, b"g"),
            field(5, 2, &init),
            field(11, 2, &input),
        ]
        .concat();
        let opset = field(2, 0, &varint(23));
        [
            field(1, 0, &varint(10)),
            field(7, 2, &graph),
            field(8, 2, &opset),
        ]
        .concat()
    }

    #[test]
    fn decodes_reference_encoding() {
        let model = ModelProto::decode(reference_model_bytes().as_slice()).unwrap();
        assert_eq!(model.ir_version, 10);
        assert_eq!(model.opset_import[0].version, 23);
        let graph = model.graph.unwrap();
        let node = &graph.node[0];
        assert_eq!(node.op_type, "Transpose");
        assert_eq!(node.attribute[0].ints, vec![1, 0]);
        assert_eq!(node.attribute[0].r#type, AttributeType::Ints as i32);
        let init = &graph.initializer[0];
        assert_eq!(init.dims, vec![3, 2]);
        assert_eq!(init.data_type, DataType::Float8e4m3fn as i32);
        assert_eq!(
            init.external_location().unwrap(),
            Some(ExternalLocation {
                location: "model.weights".into(),
                offset: 4096,
                length: Some(6),
            })
        );
        assert_eq!(
            graph.input[0].tensor_shape(),
            Some((
                DataType::Float as i32,
                vec![Dim::Symbol("batch".into()), Dim::Fixed(0)]
            ))
        );
    }

    #[test]
    fn reencodes_to_the_reference_bytes() {
        let bytes = reference_model_bytes();
        let model = ModelProto::decode(bytes.as_slice()).unwrap();
        assert_eq!(model.encode_to_vec(), bytes);
    }

    #[test]
    fn zero_valued_attributes_are_written() {
        let attr = AttributeProto::int("interleaved", 0);
        let decoded = AttributeProto::decode(attr.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded.i, Some(0));
    }

    #[test]
    fn malformed_external_offset_names_the_tensor() {
        let mut t = TensorProto::external("w", DataType::Float, &[2], "model.weights", 0, 8);
        t.external_data[1].value = "x".into();
        let err = t.external_location().unwrap_err();
        assert!(err.to_string().contains("tensor w"), "{err}");
    }
}
