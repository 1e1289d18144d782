//! Inlining of model-local functions (`ModelProto.functions`), which exporters use for modules and composite
//! ops. The rewrite needs one flat graph: a call node is replaced by the function's body, with the body's
//! tensors renamed apart and attribute references (`ref_attr_name`) bound to the call's attributes.

use std::collections::HashMap;

use super::proto::{AttributeProto, FunctionProto, ModelProto, NodeProto};
use super::{OnnxError, Result};

/// Nested calls deeper than this are refused (a recursive function would never end).
const MAX_DEPTH: usize = 32;

/// Replaces every call of a local function in the main graph by the function's body; drops the functions.
pub fn inline_local_functions(model: &mut ModelProto) -> Result<()> {
    if model.functions.is_empty() {
        return Ok(());
    }
    let functions: HashMap<(String, String), FunctionProto> =
        std::mem::take(&mut model.functions).into_iter().map(|f| ((f.domain().to_string(), f.name().to_string()), f)).collect();
    // The opsets the bodies import must be visible to the graph.
    for f in functions.values() {
        for o in &f.opset_import {
            if !model.opset_import.iter().any(|m| m.domain() == o.domain()) {
                model.opset_import.push(o.clone());
            }
        }
    }
    let Some(graph) = model.graph.as_mut() else { return Ok(()) };
    let mut counter = 0usize;
    let nodes = std::mem::take(&mut graph.node);
    graph.node = expand(nodes, &functions, &mut counter, 0)?;
    // Calls to local functions were the only users of their domains.
    Ok(())
}

fn expand(
    nodes: Vec<NodeProto>,
    functions: &HashMap<(String, String), FunctionProto>,
    counter: &mut usize,
    depth: usize,
) -> Result<Vec<NodeProto>> {
    let mut out = Vec::with_capacity(nodes.len());
    for node in nodes {
        let key = (node.domain().to_string(), node.op_type().to_string());
        let Some(f) = functions.get(&key) else {
            out.push(node);
            continue;
        };
        if depth >= MAX_DEPTH {
            return Err(OnnxError::Invalid(format!("local function `{}` nests deeper than {MAX_DEPTH} calls", f.name())));
        }
        *counter += 1;
        let scope = format!("{}/{}#{}/", node.name(), f.name(), counter);
        let mut names: HashMap<String, String> = HashMap::new();
        for (formal, actual) in f.input.iter().zip(node.input.iter()) {
            names.insert(formal.clone(), actual.clone());
        }
        for formal in f.input.iter().skip(node.input.len()) {
            names.insert(formal.clone(), String::new());
        }
        for (formal, actual) in f.output.iter().zip(node.output.iter()) {
            names.insert(formal.clone(), actual.clone());
        }
        let mut attrs: HashMap<&str, &AttributeProto> = node.attribute.iter().map(|a| (a.name(), a)).collect();
        for a in &f.attribute_proto {
            attrs.entry(a.name()).or_insert(a);
        }
        let mut body = Vec::with_capacity(f.node.len());
        for inner in &f.node {
            let mut n = inner.clone();
            let rename = |t: &String, names: &mut HashMap<String, String>| -> String {
                if t.is_empty() {
                    return String::new();
                }
                names.entry(t.clone()).or_insert_with(|| format!("{scope}{t}")).clone()
            };
            n.input = n.input.iter().map(|t| rename(t, &mut names)).collect();
            n.output = n.output.iter().map(|t| rename(t, &mut names)).collect();
            n.name = Some(format!("{scope}{}", inner.name()));
            let mut bound = Vec::with_capacity(n.attribute.len());
            for a in n.attribute {
                if a.ref_attr_name().is_empty() {
                    bound.push(a);
                } else if let Some(v) = attrs.get(a.ref_attr_name()) {
                    let mut v = (*v).clone();
                    v.name = a.name.clone();
                    bound.push(v);
                }
                // An unbound reference means the attribute is absent (its default applies).
            }
            n.attribute = bound;
            if n.metadata_props.is_empty() {
                n.metadata_props = node.metadata_props.clone();
            }
            body.push(n);
        }
        out.extend(expand(body, functions, counter, depth + 1)?);
    }
    Ok(out)
}
