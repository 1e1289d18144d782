//! Reading and making node attributes.

use super::proto::attribute_proto::AttributeType;
use super::proto::{AttributeProto, NodeProto, TensorProto};

pub fn find<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name() == name)
}

pub fn int(node: &NodeProto, name: &str) -> Option<i64> {
    find(node, name).map(|a| a.i())
}

pub fn int_or(node: &NodeProto, name: &str, default: i64) -> i64 {
    int(node, name).unwrap_or(default)
}

pub fn float_or(node: &NodeProto, name: &str, default: f32) -> f32 {
    find(node, name).map(|a| a.f()).unwrap_or(default)
}

pub fn ints(node: &NodeProto, name: &str) -> Option<Vec<i64>> {
    find(node, name).map(|a| a.ints.clone())
}

pub fn string(node: &NodeProto, name: &str) -> Option<String> {
    find(node, name).map(|a| String::from_utf8_lossy(a.s()).into_owned())
}

pub fn tensor<'a>(node: &'a NodeProto, name: &str) -> Option<&'a TensorProto> {
    find(node, name).and_then(|a| a.t.as_ref())
}

/// Removes an attribute; returns it if it was there.
pub fn remove(node: &mut NodeProto, name: &str) -> Option<AttributeProto> {
    let pos = node.attribute.iter().position(|a| a.name() == name)?;
    Some(node.attribute.remove(pos))
}

/// Sets (replaces) an attribute.
pub fn set(node: &mut NodeProto, a: AttributeProto) {
    remove(node, a.name());
    node.attribute.push(a);
}

pub fn make_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto { name: Some(name.into()), r#type: Some(AttributeType::Int as i32), i: Some(v), ..Default::default() }
}

pub fn make_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto { name: Some(name.into()), r#type: Some(AttributeType::Float as i32), f: Some(v), ..Default::default() }
}

pub fn make_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto { name: Some(name.into()), r#type: Some(AttributeType::Ints as i32), ints: v.to_vec(), ..Default::default() }
}

pub fn make_string(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::String as i32),
        s: Some(v.as_bytes().to_vec().into()),
        ..Default::default()
    }
}

pub fn make_tensor(name: &str, t: TensorProto) -> AttributeProto {
    AttributeProto { name: Some(name.into()), r#type: Some(AttributeType::Tensor as i32), t: Some(t), ..Default::default() }
}
