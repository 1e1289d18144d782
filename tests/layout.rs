//! docs/DESIGN.md §2's "must not know about" column, as a check that fails: every `use` line and every path in the
//! code of `src/` (comments left out) is read, and a module that names what its row forbids fails the test with the
//! file, the line and the rule. A new rule is a row here and in the table.

use std::path::{Path, PathBuf};

/// (module, forbidden path prefixes, the design's words for them).
const RULES: &[(&str, &[&str], &str)] = &[
    ("onnx", &["crate::api", "crate::core", "crate::backend", "crate::methods", "crate::server", "crate::config", "axum::", "ort::"], "HTTP, ORT sessions (the shape probe runs through backend's `ProbeRunner`)"),
    ("backend", &["crate::api", "crate::core", "crate::methods", "crate::server", "axum::"], "HTTP, request options"),
    ("methods", &["crate::api", "crate::core", "crate::server", "crate::config", "axum::", "ort::"], "HTTP, ORT sessions, the pipeline"),
    ("maths", &["crate::api", "crate::core", "crate::backend", "crate::methods", "crate::server", "crate::onnx", "axum::", "ort::"], "ORT, HTTP"),
    ("detection.rs", &["crate::api", "crate::core", "crate::backend", "crate::methods", "crate::server", "crate::onnx", "axum::", "ort::"], "ORT, HTTP, the serving half"),
    ("letterbox.rs", &["crate::api", "crate::core", "crate::backend", "crate::methods", "crate::server", "crate::onnx", "axum::", "ort::"], "ORT, HTTP, the serving half"),
    ("render", &["crate::api", "crate::core", "crate::backend", "crate::methods", "crate::server", "crate::onnx", "axum::", "ort::"], "ORT, HTTP"),
    ("core", &["crate::api", "crate::server", "axum::", "base64::"], "HTTP, the protocols' wire forms"),
    ("error.rs", &["crate::api", "crate::core", "crate::server", "axum::"], "HTTP"),
    ("api", &["ort::", "crate::onnx::proto", "crate::onnx::graph", "crate::onnx::rules", "crate::onnx::probe", "crate::backend::runtime"], "ONNX internals, ORT"),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a line: nothing of a comment line, and nothing after a `//` that starts a comment.
fn code(line: &str) -> &str {
    let t = line.trim_start();
    if t.starts_with("//") {
        return "";
    }
    match line.find(" // ") {
        Some(i) => &line[..i],
        None => line,
    }
}

/// Every `crate::...` and external-crate path a file's code names, with its line number. A `use` group
/// (`use crate::{a, b::c}`) counts as each of its paths, because the check reads the group's text after `use`.
fn violations(src: &Path, module: &str, forbidden: &[&str]) -> Vec<String> {
    let mut files = Vec::new();
    let root = src.join(module);
    if root.is_dir() {
        rust_files(&root, &mut files);
    } else {
        files.push(root);
    }
    let mut found = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("reading {}: {e}", f.display()));
        // `use` statements may span lines: join each one before reading it.
        let mut pending = String::new();
        let mut start = 0;
        for (i, line) in text.lines().enumerate() {
            let c = code(line);
            let t = c.trim_start();
            if pending.is_empty() && (t.starts_with("use ") || t.starts_with("pub use ") || t.starts_with("pub(crate) use ")) {
                start = i + 1;
                pending.push_str(t);
                if !t.trim_end().ends_with(';') {
                    continue;
                }
            } else if !pending.is_empty() {
                pending.push_str(t);
                if !t.trim_end().ends_with(';') {
                    continue;
                }
            }
            let (lineno, checked) = if pending.is_empty() { (i + 1, expand(c)) } else { (start, expand(&pending)) };
            for path in checked {
                if let Some(rule) = forbidden.iter().find(|p| path.starts_with(*p)) {
                    found.push(format!("{}:{lineno}: `{path}` ({rule})", f.display()));
                }
            }
            pending.clear();
        }
    }
    found
}

/// The paths in a piece of code: `crate::a::b`, `axum::x`, and each member of a `use x::{a, b::c}` group.
fn expand(code: &str) -> Vec<String> {
    let flat: String = code.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut out = Vec::new();
    let body = flat.trim_start_matches("pub(crate) ").trim_start_matches("pub ");
    if let Some(rest) = body.strip_prefix("use ") {
        let rest = rest.trim_end_matches(';');
        expand_group("", rest, &mut out);
        return out;
    }
    // Paths named inline in code.
    let bytes = flat.as_bytes();
    for start in 0..flat.len() {
        if start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_' || bytes[start - 1] == b':') {
            continue;
        }
        let tail = &flat[start..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')).unwrap_or(tail.len());
        let path = &tail[..end];
        if path.contains("::") {
            out.push(path.to_string());
        }
    }
    out
}

fn expand_group(prefix: &str, group: &str, out: &mut Vec<String>) {
    let group = group.trim();
    if let Some(open) = group.find('{') {
        let head = &group[..open];
        let inner = group[open + 1..].trim_end().trim_end_matches('}');
        let mut depth = 0;
        let mut part = String::new();
        for ch in inner.chars() {
            match ch {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand_group(&format!("{prefix}{head}"), &part, out);
                    part.clear();
                    continue;
                }
                _ => {}
            }
            part.push(ch);
        }
        if !part.trim().is_empty() {
            expand_group(&format!("{prefix}{head}"), &part, out);
        }
    } else {
        out.push(format!("{prefix}{}", group.split(" as ").next().unwrap_or(group).trim()));
    }
}

#[test]
fn no_module_names_what_the_design_forbids() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    for (module, forbidden, words) in RULES {
        for v in violations(&src, module, forbidden) {
            all.push(format!("{v}: `{module}` must not know about {words}"));
        }
    }
    assert!(all.is_empty(), "forbidden imports (docs/DESIGN.md §2):\n{}", all.join("\n"));
}

/// The check itself catches what it is for: a forbidden path in a `use` group, a multi-line `use`, and a path in
/// code, but not one in a comment.
#[test]
fn the_check_reads_groups_multiline_uses_and_inline_paths() {
    assert!(expand("use crate::{api::v1, core::{answer::Answer, task}};").contains(&"crate::api::v1".to_string()));
    assert!(expand("use crate::{api::v1, core::{answer::Answer, task}};").contains(&"crate::core::answer::Answer".to_string()));
    assert!(expand("let x = crate::api::v1::encode(a);").contains(&"crate::api::v1::encode".to_string()));
    assert_eq!(code("    // crate::api is mentioned here"), "");
    let dir = std::env::temp_dir().join(format!("camserve-layout-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("m")).unwrap();
    std::fs::write(dir.join("m/a.rs"), "use crate::{\n    api::v1,\n    x,\n};\n// crate::api in a comment\nfn f() { crate::core::g(); }\n").unwrap();
    let v = violations(&dir, "m", &["crate::api", "crate::core"]);
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(v.len(), 2, "{v:?}");
    assert!(v[0].contains("a.rs:1: `crate::api::v1`"), "{v:?}");
    assert!(v[1].contains("a.rs:6: `crate::core::g`"), "{v:?}");
}
