//! The WGSL library: every file of `shaders/` by name ([`LIBRARY`]), and the `#import`
//! composer that assembles a module from them ([`compose`]).
//!
//! A file names each file it uses on a line of its own, `#import row_state` for
//! `shaders/row_state.wgsl`. Composing writes the imports of a file before the file's own
//! text, depth first, each file at most once per module (WGSL declarations may come in
//! any order, so imports only have to avoid duplicates, and a cycle is harmless), and
//! moves `enable` and `requires` directives to the top, where WGSL wants them. There is
//! nothing else (no conditionals, no macros): the host chooses a variant by composing
//! other files, e.g. an element type and a row merge with `cross_entropy_rows`.

use std::fmt;

macro_rules! library {
    ($($name:ident),* $(,)?) => {
        /// Every file of `shaders/`, as (name without `.wgsl`, text), each included once.
        pub const LIBRARY: &[(&str, &str)] =
            &[$((stringify!($name), include_str!(concat!("../../shaders/", stringify!($name), ".wgsl")))),*];
    };
}

library!(
    bench_copy,
    bench_read,
    binary_cross_entropy,
    class_grad,
    convert_half,
    cross_entropy_backward,
    cross_entropy_rows,
    cross_entropy_soft,
    elem_bf16,
    elem_f16,
    elem_f16_native,
    elem_f32,
    elem_half,
    elem_metrics,
    elem_vec4,
    gemm,
    gemm_epilogue,
    gemm_lanes_none,
    gemm_lanes_subgroup,
    gemm_load_f32,
    gemm_load_vec4,
    grad_f32x2,
    grad_half,
    grad_mode,
    half_words,
    head_target,
    linear_colsum,
    merge_partials,
    narrow_targets,
    part_tree,
    reduce_metrics,
    reduce_sum,
    row_merge_subgroup,
    row_merge_workgroup,
    row_partials,
    row_map,
    row_metrics,
    row_metrics_off,
    row_metrics_store,
    row_state,
    row_weights,
    targets,
    workgroup,
    workgroup_sum,
);

const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// The text of library file `name` (its `#import` lines unresolved). In a constant, a
/// name the library lacks fails to compile.
pub const fn file(name: &str) -> &'static str {
    let mut i = 0;
    while i < LIBRARY.len() {
        if same(LIBRARY[i].0, name) {
            return LIBRARY[i].1;
        }
        i += 1;
    }
    panic!("no such file in shaders/")
}

/// Why a module could not be composed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ComposeError {
    /// A file the library lacks.
    Missing {
        /// The file asked for.
        name: String,
        /// The file that imports it (empty when the host asked for it).
        from: String,
    },
    /// A line that starts with `#` but is not `#import <name>`.
    Malformed {
        /// The line.
        line: String,
        /// The file it is in.
        from: String,
    },
}

impl fmt::Display for ComposeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ComposeError::Missing { name, from } if from.is_empty() => {
                write!(f, "no shaders/{name}.wgsl in the WGSL library")
            }
            ComposeError::Missing { name, from } => {
                write!(f, "{from} imports {name}, but there is no shaders/{name}.wgsl in the WGSL library")
            }
            ComposeError::Malformed { line, from } => {
                write!(f, "{from}: `{line}` is not `#import <name>` (the only directive of the WGSL library)")
            }
        }
    }
}

impl std::error::Error for ComposeError {}

struct Composer<'a> {
    library: &'a [(&'a str, &'a str)],
    /// Files already in the module (or being written).
    seen: Vec<&'a str>,
    /// `enable` / `requires` directives, in first-seen order.
    directives: Vec<&'a str>,
    body: String,
}

impl<'a> Composer<'a> {
    /// Adds the file `name` (`text`), its imports first.
    fn add(&mut self, name: &str, text: &'a str) -> Result<(), ComposeError> {
        let mut own = String::with_capacity(text.len());
        for line in text.lines() {
            let trimmed = line.trim();
            if let Some(rest) = trimmed.strip_prefix('#') {
                let malformed = || ComposeError::Malformed { line: trimmed.into(), from: name.into() };
                let rest = rest.strip_prefix("import").filter(|r| r.starts_with(char::is_whitespace));
                let mut words = rest.ok_or_else(malformed)?.split_whitespace();
                let (Some(dep), None) = (words.next(), words.next()) else { return Err(malformed()) };
                self.import(dep, name)?;
            } else if trimmed.starts_with("enable ") || trimmed.starts_with("requires ") {
                if !self.directives.contains(&trimmed) {
                    self.directives.push(trimmed);
                }
            } else {
                own.push_str(line);
                own.push('\n');
            }
        }
        self.body.push_str(&format!("// ---- {name} ----\n"));
        self.body.push_str(&own);
        Ok(())
    }

    /// Adds library file `name` unless the module has it, imported by `from`.
    fn import(&mut self, name: &str, from: &str) -> Result<(), ComposeError> {
        if self.seen.contains(&name) {
            return Ok(());
        }
        let Some((name, text)) = self.library.iter().find(|(n, _)| *n == name).copied() else {
            return Err(ComposeError::Missing { name: name.into(), from: from.into() });
        };
        self.seen.push(name);
        self.add(name, text)
    }

    fn finish(self) -> String {
        let mut out = String::new();
        for d in &self.directives {
            out.push_str(d);
            out.push('\n');
        }
        out + &self.body
    }
}

/// The module made of the library files `roots` and everything they import, from
/// `library` (name, text) pairs.
pub fn try_compose(library: &[(&str, &str)], roots: &[&str]) -> Result<String, ComposeError> {
    let mut c = Composer { library, seen: Vec::new(), directives: Vec::new(), body: String::new() };
    for root in roots {
        c.import(root, "")?;
    }
    Ok(c.finish())
}

/// The module made of the files `roots` of [`LIBRARY`] and everything they import.
///
/// # Panics
/// When a file is missing or an import line is malformed (a bug of the library, which
/// tests/shaders.rs catches).
pub fn compose(roots: &[&str]) -> String {
    try_compose(LIBRARY, roots).unwrap_or_else(|e| panic!("WGSL library: {e}"))
}

/// The module made of `text` (named `name` in messages) with its imports from
/// [`LIBRARY`].
///
/// # Panics
/// As [`compose`].
pub fn compose_text(name: &str, text: &str) -> String {
    let mut c = Composer { library: LIBRARY, seen: Vec::new(), directives: Vec::new(), body: String::new() };
    if let Some(&(n, _)) = LIBRARY.iter().find(|(_, t)| *t == text) {
        c.seen.push(n);
    }
    c.add(name, text).unwrap_or_else(|e| panic!("WGSL library: {e}"));
    c.finish()
}

/// `source` with the value of its declaration `const NAME: u32 = ...;` set to `value`:
/// how the host sizes a function-scope array (which a pipeline constant cannot size).
///
/// # Panics
/// Unless `source` declares `name` so exactly once.
pub fn with_u32_const(source: &str, name: &str, value: u32) -> String {
    let decl = format!("const {name}: u32 = ");
    let is_decl = |line: &str| line.trim_start().starts_with(&decl);
    let count = source.lines().filter(|l| is_decl(l)).count();
    assert!(count == 1, "WGSL: {count} declarations `{decl}...;`, expected exactly one");
    let mut out = String::with_capacity(source.len() + 8);
    for line in source.lines() {
        if is_decl(line) {
            out.push_str(&format!("{decl}{value}u;"));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}
