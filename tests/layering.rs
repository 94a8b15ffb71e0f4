//! The modules of `src/gpu` form a layered graph: no module imports (through `super::`
//! or `crate::gpu::`, directly or through a re-export of `gpu/mod.rs`) a module that
//! imports it back, however long the way round. Read from the sources, so that a new
//! file or import is checked too.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Source without comments (doc links name modules they do not import) and string
/// literals.
fn code_of(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut chars = source.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                let mut prev = ' ';
                for c in chars.by_ref() {
                    if prev == '*' && c == '/' {
                        break;
                    }
                    prev = c;
                }
                out.push(' ');
            }
            '"' => {
                let mut escaped = false;
                for c in chars.by_ref() {
                    match c {
                        '\\' if !escaped => escaped = true,
                        '"' if !escaped => break,
                        _ => escaped = false,
                    }
                }
                out.push_str("\"\"");
            }
            _ => out.push(c),
        }
    }
    out
}

fn ident_at(s: &str) -> &str {
    let end = s.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(s.len());
    &s[..end]
}

/// The first identifiers of each path after `prefix` (`prefix::a::X`, `prefix::{a, b::Y}`,
/// `prefix::super::c` as `c`).
fn paths_after<'a>(code: &'a str, prefix: &str) -> Vec<&'a str> {
    let mut found = Vec::new();
    for (at, _) in code.match_indices(prefix) {
        // A path's first segment: not the tail of `xsuper::` or the second `super::`.
        let before = &code[..at];
        if before.ends_with("::")
            || before.chars().next_back().is_some_and(|c| c.is_alphanumeric() || c == '_')
        {
            continue;
        }
        let mut rest = &code[at + prefix.len()..];
        while let Some(r) = rest.strip_prefix("super::") {
            rest = r;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut start = 0;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        found.push(ident_at(group[start..i].trim_start()));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.push(ident_at(group[start..i].trim_start()));
                        start = i + 1;
                    }
                    _ => {}
                }
            }
        } else {
            found.push(ident_at(rest));
        }
    }
    found
}

/// Items `gpu/mod.rs` re-exports, and the module each comes from.
fn re_exports(mod_rs: &str) -> BTreeMap<String, String> {
    let mut items = BTreeMap::new();
    for line in code_of(mod_rs).lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("pub use ").or_else(|| line.strip_prefix("pub(crate) use "))
        else {
            continue;
        };
        let Some((module, tail)) = rest.split_once("::") else { continue };
        let tail = tail.trim_end_matches(';');
        let names: Vec<&str> = match tail.strip_prefix('{') {
            Some(group) => group.trim_end_matches('}').split(',').map(str::trim).collect(),
            None => vec![tail.trim()],
        };
        for name in names.into_iter().filter(|n| !n.is_empty()) {
            let name = name.rsplit(" as ").next().unwrap_or(name);
            items.insert(name.to_string(), module.to_string());
        }
    }
    items
}

/// Who imports whom among the files of `src/gpu` (`mod.rs` left out: it is the parent).
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/gpu");
    let mut sources = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "rs") {
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            sources.insert(name, std::fs::read_to_string(&path).unwrap());
        }
    }
    let mod_rs = sources.remove("mod").expect("src/gpu/mod.rs");
    let exported = re_exports(&mod_rs);
    let mut graph = BTreeMap::new();
    for (name, source) in &sources {
        let code = code_of(source);
        let mut uses = BTreeSet::new();
        for first in paths_after(&code, "super::").into_iter().chain(paths_after(&code, "crate::gpu::")) {
            let target = if sources.contains_key(first) {
                Some(first.to_string())
            } else {
                exported.get(first).cloned()
            };
            if let Some(target) = target.filter(|t| t != name) {
                uses.insert(target);
            }
        }
        graph.insert(name.clone(), uses);
    }
    graph
}

/// A cycle of the graph, as the modules along it (the first repeated at the end).
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        marks.insert(node.to_string(), Mark::Open);
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            match marks.get(next.as_str()).copied().unwrap_or(Mark::New) {
                Mark::Open => {
                    let from = path.iter().position(|m| m == next).expect("open nodes are on the path");
                    let mut cycle = path[from..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(cycle) = visit(next, graph, marks, path) {
                        return Some(cycle);
                    }
                }
                Mark::Done => {}
            }
        }
        path.pop();
        marks.insert(node.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in graph.keys() {
        if marks.get(node.as_str()).copied().unwrap_or(Mark::New) == Mark::New
            && let Some(cycle) = visit(node, graph, &mut marks, &mut Vec::new())
        {
            return Some(cycle);
        }
    }
    None
}

fn render(graph: &BTreeMap<String, BTreeSet<String>>) -> String {
    graph
        .iter()
        .map(|(m, uses)| format!("  {m} -> {}", uses.iter().cloned().collect::<Vec<_>>().join(", ")))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn src_gpu_has_no_import_cycle() {
    let graph = module_graph();
    assert!(graph.len() >= 10, "read the modules of src/gpu:\n{}", render(&graph));
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle in src/gpu: {}\nthe graph:\n{}", cycle.join(" -> "), render(&graph));
    }
}

#[test]
fn the_pure_modules_stay_low() {
    let graph = module_graph();
    let uses = |m: &str| graph.get(m).cloned().unwrap_or_default();
    // The planner is a pure function of the shape and the limits, tested without a GPU.
    assert!(uses("plan").iter().all(|m| m == "tuning"), "plan imports {:?}", uses("plan"));
    // The workspace is plain data over buffers.
    assert!(uses("workspace").iter().all(|m| m == "buffers"), "workspace imports {:?}", uses("workspace"));
    // The context does not know its drivers.
    for driver in ["stream", "soft", "binary", "backward", "resident", "evaluate", "bench"] {
        assert!(!uses("context").contains(driver), "context imports {driver}");
    }
}

#[test]
fn the_parser_sees_a_cycle() {
    // The checker itself: paths in groups, through re-exports, and a cycle it must find.
    let code =
        code_of("use super::{a::X, b};\n// use super::c;\nfn f() { super::super::d::g(\"super::e\") }");
    assert_eq!(paths_after(&code, "super::"), ["a", "b", "d"]);
    let exported = re_exports("pub use a::{X, Y as Z};\npub(crate) use b::w;\n");
    assert_eq!(exported.get("Z").map(String::as_str), Some("a"));
    assert_eq!(exported.get("w").map(String::as_str), Some("b"));
    let graph: BTreeMap<String, BTreeSet<String>> = [("a", "b"), ("b", "c"), ("c", "a"), ("d", "a")]
        .into_iter()
        .map(|(m, u)| (m.to_string(), BTreeSet::from([u.to_string()])))
        .collect();
    let cycle = find_cycle(&graph).expect("a cycle");
    assert_eq!(cycle.first(), cycle.last());
    assert_eq!(cycle.len(), 4, "{cycle:?}");
}
