//! The explain-model contract (docs/DESIGN.md §3): names every explain graph uses, and recognising models that
//! already satisfy it.

use super::proto::{ModelProto, StringStringEntryProto};
use super::rules::ReluRule;

pub const SEED: &str = "camserve.seed";
pub const ACTIVATIONS: &str = "camserve.activations";
pub const GRADIENTS: &str = "camserve.gradients";
pub const INPUT_GRAD_PREFIX: &str = "camserve.input_grad.";
/// Attention plans (`ExplainPlan::attention`): block i's attention probabilities `[N, heads, T, T]` and their
/// exact gradients, i = 0 for the first block.
pub const ATTENTION_PREFIX: &str = "camserve.attention.";
pub const ATTENTION_GRAD_PREFIX: &str = "camserve.attention_grad.";
/// Engine-internal extension (see `ExplainPlan::select_targets`).
pub const TARGET_RANK: &str = "camserve.target_rank";
pub const TARGET_INDEX: &str = "camserve.target_index";
pub const META_CONTRACT: &str = "camserve.contract";
pub const META_LAYER: &str = "camserve.layer";
pub const META_RULES: &str = "camserve.rules";
pub const CONTRACT_VERSION: &str = "1";

pub fn input_grad_name(rule: ReluRule) -> String {
    format!("{INPUT_GRAD_PREFIX}{}", rule.as_str())
}

pub fn attention_name(block: usize) -> String {
    format!("{ATTENTION_PREFIX}{block}")
}

pub fn attention_grad_name(block: usize) -> String {
    format!("{ATTENTION_GRAD_PREFIX}{block}")
}

/// What a contract model says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContractInfo {
    pub layer: String,
    pub rules: Vec<ReluRule>,
    /// The image input's name.
    pub input: String,
    /// The logits output's name.
    pub logits: String,
}

fn meta<'a>(model: &'a ModelProto, key: &str) -> Option<&'a str> {
    model.metadata_props.iter().find(|p| p.key() == key).map(|p| p.value())
}

pub fn set_meta(model: &mut ModelProto, key: &str, value: &str) {
    model.metadata_props.retain(|p| p.key() != key);
    model.metadata_props.push(StringStringEntryProto { key: Some(key.into()), value: Some(value.into()) });
}

/// Some(info) when the model follows the contract (marker, seed input, activations and gradients outputs).
pub fn contract_info(model: &ModelProto) -> Option<ContractInfo> {
    if meta(model, META_CONTRACT)? != CONTRACT_VERSION {
        return None;
    }
    let g = model.graph.as_ref()?;
    let inits: std::collections::HashSet<&str> = g.initializer.iter().map(|t| t.name()).collect();
    let inputs: Vec<&str> = g.input.iter().map(|i| i.name()).filter(|n| !inits.contains(n)).collect();
    let outputs: Vec<&str> = g.output.iter().map(|o| o.name()).collect();
    if !inputs.contains(&SEED) || !outputs.contains(&ACTIVATIONS) || !outputs.contains(&GRADIENTS) {
        return None;
    }
    let input = inputs.iter().find(|&&n| n != SEED)?.to_string();
    let logits = outputs.iter().find(|n| !n.starts_with("camserve."))?.to_string();
    let rules: Vec<ReluRule> = meta(model, META_RULES)
        .unwrap_or("")
        .split(',')
        .filter_map(|r| ReluRule::parse(r.trim()))
        .filter(|r| outputs.contains(&input_grad_name(*r).as_str()))
        .collect();
    Some(ContractInfo { layer: meta(model, META_LAYER).unwrap_or("").to_string(), rules, input, logits })
}
