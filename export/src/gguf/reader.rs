//! The GGUF container: header, metadata, tensor index and data section, versions 2 and 3
//! (little-endian; version 1's 32-bit counts are long gone from the wild and are refused).
//!
//! [`GgufIndex::parse`] works on a byte slice and never reads past it: each length, count and
//! offset is compared with the bytes that remain before anything is allocated for it, and sizes
//! are computed with checked arithmetic. Memory therefore stays within a small multiple of the
//! file's own size whatever the file claims. [`GgufFile`] maps a file and keeps its index.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::dequant::{self, DequantError, GgmlType};
use super::value::{Array, Value};

/// `GGUF` read as a little-endian u32.
const MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section and of tensor offsets when `general.alignment` is absent.
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays deeper than this are refused: they have no use, and unbounded nesting
/// would let a file exhaust the stack.
const MAX_ARRAY_DEPTH: usize = 3;

/// What is wrong with a GGUF byte stream. Offsets are byte positions in the file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not a GGUF file (magic {found:02x?}, expected \"GGUF\")")]
    BadMagic { found: Vec<u8> },
    #[error("GGUF version {0} is not supported (supported: 2, 3)")]
    UnsupportedVersion(u32),
    #[error("truncated: {what} at offset {offset} needs {needed} bytes, {available} remain")]
    Truncated {
        what: String,
        offset: usize,
        needed: u64,
        available: usize,
    },
    #[error("{what} at offset {offset} is not valid UTF-8")]
    InvalidUtf8 { what: String, offset: usize },
    #[error("metadata key {key:?} has unknown value type {type_id}")]
    UnknownValueType { key: String, type_id: u32 },
    #[error("metadata key {key:?} nests arrays deeper than {MAX_ARRAY_DEPTH}")]
    NestedTooDeep { key: String },
    #[error("metadata key {0:?} appears twice")]
    DuplicateKey(String),
    #[error("metadata key {key:?} is {found}, expected {expected}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("general.alignment = {0} is not a power of two")]
    BadAlignment(u64),
    #[error("tensor {0:?} appears twice")]
    DuplicateTensor(String),
    #[error("tensor {tensor:?} has {n_dims} dimensions (at most {MAX_DIMS})")]
    TooManyDims { tensor: String, n_dims: u32 },
    #[error("tensor {tensor:?} has unknown element type {type_id}")]
    UnknownTensorType { tensor: String, type_id: u32 },
    #[error(
        "tensor {tensor:?}: shape {dims:?} of {ty} is not a whole number of blocks or overflows"
    )]
    BadShape {
        tensor: String,
        dims: Vec<u64>,
        ty: &'static str,
    },
    #[error("tensor {tensor:?}: offset {offset} is not a multiple of the alignment {alignment}")]
    Misaligned {
        tensor: String,
        offset: u64,
        alignment: u64,
    },
    #[error(
        "tensor {tensor:?}: bytes {offset}..{end} of the data section lie past its end ({available} bytes)"
    )]
    OutOfBounds {
        tensor: String,
        offset: u64,
        end: u128,
        available: usize,
    },
}

/// A GGUF file that could not be opened or read, with its path.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Format { path: PathBuf, source: FormatError },
    #[error("{path}: tensor {tensor:?} is not in the file")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{path}: tensor {tensor:?}: {source}")]
    Dequant {
        path: PathBuf,
        tensor: String,
        source: DequantError,
    },
}

/// One tensor of the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the innermost (contiguous) dimension, so a PyTorch `[out, in]`
    /// weight is `[in, out]` here.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Byte range in the file (not relative to the data section).
    pub start: usize,
    pub len: usize,
}

impl TensorInfo {
    /// Element count; fits in `usize` because the tensor's bytes fit in the file.
    pub fn elements(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }

    /// The shape in row-major (PyTorch) order, outermost first.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// The parsed header of a GGUF file: everything but the tensor bytes.
#[derive(Debug, Clone)]
pub struct GgufIndex {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    /// In file order.
    pub tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    pub alignment: u64,
    /// File offset of the data section.
    pub data_start: usize,
}

impl GgufIndex {
    /// Parses and validates the header of `bytes`, a whole GGUF file.
    pub fn parse(bytes: &[u8]) -> Result<Self, FormatError> {
        let mut r = Cursor { bytes, pos: 0 };
        let magic = r.take(4, "magic")?;
        if magic != MAGIC {
            return Err(FormatError::BadMagic {
                found: magic.to_vec(),
            });
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;

        // A key-value pair takes at least 8 (key length) + 4 (type) + 1 bytes.
        r.check_count(n_kv, 13, "metadata")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let type_id = r.u32("metadata value type")?;
            let value = r.value(&key, type_id, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(FormatError::DuplicateKey(key));
            }
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => v.as_u64().ok_or_else(|| FormatError::WrongType {
                key: "general.alignment".into(),
                expected: "an unsigned integer",
                found: v.type_name(),
            })?,
        };
        if !alignment.is_power_of_two() {
            return Err(FormatError::BadAlignment(alignment));
        }

        // A tensor info takes at least 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset).
        r.check_count(n_tensors, 24, "tensor infos")?;
        let mut raw = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            let n_dims = r.u32("tensor dimension count")?;
            if n_dims > MAX_DIMS {
                return Err(FormatError::TooManyDims {
                    tensor: name,
                    n_dims,
                });
            }
            let dims = (0..n_dims)
                .map(|_| r.u64("tensor dimension"))
                .collect::<Result<Vec<_>, _>>()?;
            let type_id = r.u32("tensor type")?;
            let ty = GgmlType::from_id(type_id).ok_or_else(|| FormatError::UnknownTensorType {
                tensor: name.clone(),
                type_id,
            })?;
            let offset = r.u64("tensor offset")?;
            raw.push((name, dims, ty, offset));
        }

        // The data section starts at the next multiple of the alignment; with no tensors it may
        // lie past the end of the file.
        let data_start = (r.pos as u64).div_ceil(alignment).saturating_mul(alignment);
        let available = bytes.len().saturating_sub(data_start as usize);
        let mut tensors = Vec::with_capacity(raw.len());
        let mut by_name = HashMap::with_capacity(raw.len());
        for (name, dims, ty, offset) in raw {
            let size = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .filter(|_| {
                    dims.first()
                        .is_none_or(|d0| d0 % ty.block_elems() as u64 == 0)
                })
                .and_then(|n| ty.bytes_for(n))
                .ok_or_else(|| FormatError::BadShape {
                    tensor: name.clone(),
                    dims: dims.clone(),
                    ty: ty.name(),
                })?;
            if offset % alignment != 0 {
                return Err(FormatError::Misaligned {
                    tensor: name,
                    offset,
                    alignment,
                });
            }
            let end = u128::from(offset) + u128::from(size);
            if end > available as u128 || data_start > bytes.len() as u64 {
                return Err(FormatError::OutOfBounds {
                    tensor: name,
                    offset,
                    end,
                    available,
                });
            }
            if by_name.insert(name.clone(), tensors.len()).is_some() {
                return Err(FormatError::DuplicateTensor(name));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                // Both fit: the range lies inside `bytes`.
                start: data_start as usize + offset as usize,
                len: size as usize,
            });
        }

        Ok(GgufIndex {
            version,
            metadata,
            tensors,
            by_name,
            alignment,
            data_start: data_start as usize,
        })
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }
}

/// A memory-mapped GGUF file and its index.
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    index: GgufIndex,
}

impl GgufFile {
    /// Maps and indexes `path`. Tensor bytes are not read until asked for.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; a file truncated underneath us by another process would
        // fault, as for every mmap-based model loader. That is the documented trade-off of
        // reading multi-gigabyte checkpoints without copying them.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let index = GgufIndex::parse(&map).map_err(|source| GgufError::Format {
            path: path.to_owned(),
            source,
        })?;
        Ok(GgufFile {
            path: path.to_owned(),
            map,
            index,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole mapped file (for digests).
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    pub fn index(&self) -> &GgufIndex {
        &self.index
    }

    /// The tensor's info, or an error naming it and the file.
    pub fn info(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.index
            .tensor(name)
            .ok_or_else(|| GgufError::MissingTensor {
                path: self.path.clone(),
                tensor: name.to_owned(),
            })
    }

    /// The tensor's stored bytes, borrowed from the map.
    pub fn raw(&self, info: &TensorInfo) -> &[u8] {
        &self.map[info.start..info.start + info.len]
    }

    /// The tensor decoded to f32, in ggml element order (row-major over the reversed dims).
    pub fn dequantize(&self, info: &TensorInfo) -> Result<Vec<f32>, GgufError> {
        let mut out = vec![0f32; info.elements()];
        dequant::dequantize(info.ty, self.raw(info), &mut out).map_err(|source| {
            GgufError::Dequant {
                path: self.path.clone(),
                tensor: info.name.clone(),
                source,
            }
        })?;
        Ok(out)
    }
}

/// A bounds-checked little-endian reader over the file's bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn truncated(&self, what: &str, needed: u64) -> FormatError {
        FormatError::Truncated {
            what: what.to_owned(),
            offset: self.pos,
            needed,
            available: self.remaining(),
        }
    }

    /// Refuses `count` items of at least `min_size` bytes each unless they can fit in what
    /// remains; called before any allocation sized by `count`.
    fn check_count(&self, count: u64, min_size: u64, what: &str) -> Result<(), FormatError> {
        match count.checked_mul(min_size) {
            Some(n) if n <= self.remaining() as u64 => Ok(()),
            _ => Err(self.truncated(&format!("{count} {what}"), count.saturating_mul(min_size))),
        }
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], FormatError> {
        if n > self.remaining() as u64 {
            return Err(self.truncated(what, n));
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.bytes[start..self.pos])
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], FormatError> {
        let bytes = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, FormatError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, FormatError> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &str) -> Result<String, FormatError> {
        let len = self.u64(what)?;
        let offset = self.pos;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| FormatError::InvalidUtf8 {
            what: what.to_owned(),
            offset,
        })
    }

    fn value(&mut self, key: &str, type_id: u32, depth: usize) -> Result<Value, FormatError> {
        let what = key;
        Ok(match type_id {
            0 => Value::U8(u8::from_le_bytes(self.array(what)?)),
            1 => Value::I8(i8::from_le_bytes(self.array(what)?)),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(u32::from_le_bytes(self.array(what)?)),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => Value::Bool(self.array::<1>(what)?[0] != 0),
            8 => Value::String(self.string(what)?),
            9 => Value::Array(self.array_value(key, depth)?),
            10 => Value::U64(u64::from_le_bytes(self.array(what)?)),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            _ => {
                return Err(FormatError::UnknownValueType {
                    key: key.to_owned(),
                    type_id,
                });
            }
        })
    }

    /// Reads `count` fixed-size elements after checking they fit.
    fn fixed<T, const N: usize>(
        &mut self,
        count: u64,
        what: &str,
        decode: fn([u8; N]) -> T,
    ) -> Result<Vec<T>, FormatError> {
        self.check_count(count, N as u64, what)?;
        let bytes = self.take(count * N as u64, what)?;
        Ok(bytes
            .chunks_exact(N)
            .map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                decode(a)
            })
            .collect())
    }

    fn array_value(&mut self, key: &str, depth: usize) -> Result<Array, FormatError> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(FormatError::NestedTooDeep {
                key: key.to_owned(),
            });
        }
        let elem_type = self.u32(key)?;
        let count = self.u64(key)?;
        Ok(match elem_type {
            0 => Array::U8(self.fixed(count, key, u8::from_le_bytes)?),
            1 => Array::I8(self.fixed(count, key, i8::from_le_bytes)?),
            2 => Array::U16(self.fixed(count, key, u16::from_le_bytes)?),
            3 => Array::I16(self.fixed(count, key, i16::from_le_bytes)?),
            4 => Array::U32(self.fixed(count, key, u32::from_le_bytes)?),
            5 => Array::I32(self.fixed(count, key, i32::from_le_bytes)?),
            6 => Array::F32(self.fixed(count, key, f32::from_le_bytes)?),
            7 => Array::Bool(self.fixed(count, key, |[b]: [u8; 1]| b != 0)?),
            8 => {
                self.check_count(count, 8, key)?;
                let mut out = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    out.push(self.string(key)?);
                }
                Array::String(out)
            }
            9 => {
                // An inner array takes at least 4 (type) + 8 (count) bytes.
                self.check_count(count, 12, key)?;
                let mut out = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    out.push(self.array_value(key, depth + 1)?);
                }
                Array::Array(out)
            }
            10 => Array::U64(self.fixed(count, key, u64::from_le_bytes)?),
            11 => Array::I64(self.fixed(count, key, i64::from_le_bytes)?),
            12 => Array::F64(self.fixed(count, key, f64::from_le_bytes)?),
            type_id => {
                return Err(FormatError::UnknownValueType {
                    key: key.to_owned(),
                    type_id,
                });
            }
        })
    }
}
