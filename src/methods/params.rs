//! The parameters methods declare: each [`Param`] says its name, type, range, default and help; a method's entry
//! lists the ones it reads ([`MethodDef::params`](super::MethodDef)). Everything else follows from the
//! declarations: parsing from the three request forms and the OIP and KServe parameters (`core::options`), range
//! checks, the CLI's flags, and the test that holds openapi.yaml and docs/METHODS.md to them.
//!
//! A request's values are a [`Params`]: what the method reads with [`Params::count`], [`Params::number`] and
//! [`Params::integer`], the declared default where the request gave none.

use std::collections::BTreeMap;

use super::Method;

/// A parameter's type and range.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ParamKind {
    /// An integer in `1..=max`.
    Count { default: usize, max: usize },
    /// A finite number in `min..=max`.
    Number { default: f64, min: f64, max: f64 },
    /// An optional non-negative integer (a seed); no default.
    Seed,
    /// An optional integer >= 1 (a cap); no default.
    Cap,
}

/// One declared parameter.
#[derive(Debug)]
pub struct Param {
    /// Its name in every request form and as the CLI flag `--<name>`.
    pub name: &'static str,
    pub kind: ParamKind,
    /// One line for the CLI's help and the documents.
    pub help: &'static str,
}

impl Param {
    /// What a request gets without it, as text (`None` where there is no default).
    pub fn default_text(&self) -> Option<String> {
        match self.kind {
            ParamKind::Count { default, .. } => Some(default.to_string()),
            ParamKind::Number { default, .. } => Some(default.to_string()),
            ParamKind::Seed | ParamKind::Cap => None,
        }
    }

    /// The type and range, as the documents state them.
    pub fn range_text(&self) -> String {
        match self.kind {
            ParamKind::Count { max, .. } => format!("integer, 1 to {max}"),
            ParamKind::Number { min, max, .. } => format!("number, {min} to {max}"),
            ParamKind::Seed => "integer >= 0".into(),
            ParamKind::Cap => "integer >= 1".into(),
        }
    }

    /// Checks a value as received (an integer or a number) against the declaration.
    pub fn check(&self, v: ParamValue) -> Result<ParamValue, String> {
        let name = self.name;
        let int = |v: ParamValue| match v {
            ParamValue::Int(n) => Ok(n),
            ParamValue::Number(x) => Err(format!("{name} must be an integer, not {x}")),
        };
        match self.kind {
            ParamKind::Count { max, .. } => match int(v)? {
                n if n >= 1 && n as usize <= max => Ok(v),
                n => Err(format!("{name} must be between 1 and {max}, not {n}")),
            },
            ParamKind::Number { min, max, .. } => {
                let x = match v {
                    ParamValue::Int(n) => n as f64,
                    ParamValue::Number(x) => x,
                };
                if x.is_finite() && (min..=max).contains(&x) { Ok(ParamValue::Number(x)) } else { Err(format!("{name} must be between {min} and {max}, not {x}")) }
            }
            ParamKind::Seed => match int(v)? {
                n if n >= 0 => Ok(v),
                n => Err(format!("{name} must be a non-negative integer, not {n}")),
            },
            ParamKind::Cap => match int(v)? {
                n if n >= 1 => Ok(v),
                n => Err(format!("{name} must be at least 1, not {n}")),
            },
        }
    }

    /// Whether the value is an integer (otherwise a number).
    pub fn is_integer(&self) -> bool {
        !matches!(self.kind, ParamKind::Number { .. })
    }
}

/// A parameter's value as a request gives it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ParamValue {
    Int(i64),
    Number(f64),
}

/// Every parameter some method declares, once each, in the order of [`Method::ALL`].
pub fn all() -> Vec<&'static Param> {
    let mut out: Vec<&'static Param> = Vec::new();
    for m in Method::ALL {
        for &p in m.params {
            if !out.iter().any(|q| q.name == p.name) {
                out.push(p);
            }
        }
    }
    out
}

/// The declared parameter named `name`.
pub fn find(name: &str) -> Option<&'static Param> {
    all().into_iter().find(|p| p.name == name)
}

/// A request's checked parameter values, by name; a method reads them through its declarations.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Params {
    values: BTreeMap<&'static str, ParamValue>,
}

impl Params {
    /// Sets a value (checked against its declaration by the caller, `Param::check`).
    pub fn set(&mut self, p: &'static Param, v: ParamValue) {
        self.values.insert(p.name, v);
    }

    /// Removes a value: the parameter reads as its default again.
    pub fn clear(&mut self, p: &Param) {
        self.values.remove(p.name);
    }

    fn int(&self, p: &Param) -> Option<i64> {
        match self.values.get(p.name) {
            Some(ParamValue::Int(n)) => Some(*n),
            Some(ParamValue::Number(x)) => Some(*x as i64),
            None => None,
        }
    }

    /// A `Count`'s value, or its default.
    pub fn count(&self, p: &Param) -> usize {
        match p.kind {
            ParamKind::Count { default, .. } => self.int(p).map_or(default, |n| n as usize),
            _ => self.int(p).unwrap_or(0).max(0) as usize,
        }
    }

    /// A `Number`'s value, or its default.
    pub fn number(&self, p: &Param) -> f32 {
        let default = match p.kind {
            ParamKind::Number { default, .. } => default,
            _ => 0.0,
        };
        match self.values.get(p.name) {
            Some(ParamValue::Number(x)) => *x as f32,
            Some(ParamValue::Int(n)) => *n as f32,
            None => default as f32,
        }
    }

    /// A `Seed`'s or `Cap`'s value, if given.
    pub fn integer(&self, p: &Param) -> Option<u64> {
        self.int(p).map(|n| n.max(0) as u64)
    }
}
