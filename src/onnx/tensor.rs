//! Reading and making `TensorProto`s (initializers, constants, probe results).

use bytes::Bytes;

use super::proto::tensor_proto::{DataLocation, DataType};
use super::proto::TensorProto;

pub const FLOAT: i32 = DataType::Float as i32;
pub const INT64: i32 = DataType::Int64 as i32;
pub const INT32: i32 = DataType::Int32 as i32;
pub const DOUBLE: i32 = DataType::Double as i32;
pub const BOOL: i32 = DataType::Bool as i32;

/// True for the element types a gradient can flow through.
pub fn is_float_type(data_type: i32) -> bool {
    data_type == FLOAT || data_type == DOUBLE || data_type == DataType::Float16 as i32 || data_type == DataType::Bfloat16 as i32
}

pub fn numel(dims: &[i64]) -> usize {
    dims.iter().map(|&d| d.max(0) as usize).product()
}

/// Values of a float tensor (float32 or float64 stored), or None for other types / external data.
pub fn to_f32(t: &TensorProto) -> Option<Vec<f32>> {
    if t.data_location() == DataLocation::External {
        return None;
    }
    let n = numel(&t.dims);
    let v: Vec<f32> = match DataType::try_from(t.data_type()).ok()? {
        DataType::Float => {
            if !t.raw_data().is_empty() {
                t.raw_data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
            } else {
                t.float_data.clone()
            }
        }
        DataType::Double => {
            if !t.raw_data().is_empty() {
                t.raw_data().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32).collect()
            } else {
                t.double_data.iter().map(|&x| x as f32).collect()
            }
        }
        _ => return None,
    };
    (v.len() == n).then_some(v)
}

/// Values of an integer tensor (int64 / int32 / uint8 / int8 / bool stored), widened to i64.
pub fn to_i64(t: &TensorProto) -> Option<Vec<i64>> {
    if t.data_location() == DataLocation::External {
        return None;
    }
    let n = numel(&t.dims);
    let raw = t.raw_data();
    let dt = DataType::try_from(t.data_type()).ok()?;
    let v: Vec<i64> = match dt {
        DataType::Int64 => {
            if !raw.is_empty() {
                raw.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect()
            } else {
                t.int64_data.clone()
            }
        }
        DataType::Int32 => {
            if !raw.is_empty() {
                raw.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap_or([0; 4])) as i64).collect()
            } else {
                t.int32_data.iter().map(|&x| x as i64).collect()
            }
        }
        DataType::Int8 | DataType::Uint8 | DataType::Bool => {
            if !raw.is_empty() {
                if dt == DataType::Int8 {
                    raw.iter().map(|&b| b as i8 as i64).collect()
                } else {
                    raw.iter().map(|&b| b as i64).collect()
                }
            } else {
                t.int32_data.iter().map(|&x| x as i64).collect()
            }
        }
        _ => return None,
    };
    (v.len() == n).then_some(v)
}

pub fn f32_tensor(name: &str, dims: &[i64], data: &[f32]) -> TensorProto {
    debug_assert_eq!(numel(dims), data.len());
    let mut raw = Vec::with_capacity(data.len() * 4);
    for x in data {
        raw.extend_from_slice(&x.to_le_bytes());
    }
    TensorProto {
        name: Some(name.to_string()),
        dims: dims.to_vec(),
        data_type: Some(FLOAT),
        raw_data: Some(Bytes::from(raw)),
        ..Default::default()
    }
}

pub fn i64_tensor(name: &str, dims: &[i64], data: &[i64]) -> TensorProto {
    debug_assert_eq!(numel(dims), data.len());
    let mut raw = Vec::with_capacity(data.len() * 8);
    for x in data {
        raw.extend_from_slice(&x.to_le_bytes());
    }
    TensorProto {
        name: Some(name.to_string()),
        dims: dims.to_vec(),
        data_type: Some(INT64),
        raw_data: Some(Bytes::from(raw)),
        ..Default::default()
    }
}
