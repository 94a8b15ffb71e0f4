//! The WGSL library and every module the host builds from it, checked with naga: each
//! module validates (a typo fails `cargo test`), its `Params` is laid out as the host's
//! parameter block, the constants it shares with the host have the host's values, and
//! the `#import` composer resolves, deduplicates and reports as documented.

use std::collections::{BTreeSet, HashSet};

use naga::{AddressSpace, Expression, Literal, Module, ScalarKind, TypeInner};
use xent::gpu::wgsl::{ComposeError, LIBRARY, compose, try_compose};
use xent::gpu::{Shader, shaders};

fn parse(shader: &Shader) -> Module {
    let source = shader.source.as_str();
    naga::front::wgsl::parse_str(source)
        .unwrap_or_else(|e| panic!("{}: {}", shader.name, e.emit_to_string(source)))
}

#[test]
fn every_shader_validates_with_naga() {
    for shader in shaders() {
        let module = parse(&shader);
        naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
            .validate(&module)
            .unwrap_or_else(|e| panic!("{}: {}", shader.name, e.emit_to_string(&shader.source)));
        // The GEMM's module also holds the linear head's epilogues (gemm_epilogue.wgsl).
        let want: &[&str] =
            if shader.name.starts_with("gemm") { &["main", "partials", "grad"] } else { &["main"] };
        let got: Vec<_> = module.entry_points.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(got, want, "{}: its compute entry points", shader.name);
    }
}

/// Every element format with either merge, every other kernel once; no two the same.
#[test]
fn shaders_list_every_variant_once() {
    let all = shaders();
    let rows: Vec<_> = all.iter().filter(|s| s.name.starts_with("cross_entropy_rows")).collect();
    // f32, vec4, f16 (portable, native) and bf16, each half one with an f32 or a half
    // gradient: 8 formats, each with the subgroup and the workgroup merge, with and
    // without the metrics.
    assert_eq!(rows.len(), 32, "{:?}", rows.iter().map(|s| &s.name).collect::<Vec<_>>());
    for needle in ["native f16, f16 gradient", "native f16, f32 gradient", "bf16, bf16 gradient", "subgroups"]
    {
        assert!(rows.iter().any(|s| s.name.contains(needle)), "no rows variant with {needle}");
    }
    let names: HashSet<_> = all.iter().map(|s| s.name.as_str()).collect();
    let sources: HashSet<_> = all.iter().map(|s| s.source.as_str()).collect();
    assert_eq!(names.len(), all.len(), "names repeat");
    assert_eq!(sources.len(), all.len(), "two variants build the same source");
    for kernel in [
        "row_partials",
        "merge_partials",
        "cross_entropy_backward",
        "row_weights",
        "narrow_targets",
        "reduce_sum",
        "cross_entropy_soft",
        "binary_cross_entropy",
        "bench_copy",
        "bench_read",
    ] {
        assert!(names.contains(kernel), "{kernel} missing from shaders()");
    }
}

fn wgsl_scalar(module: &Module, ty: naga::Handle<naga::Type>) -> Option<&'static str> {
    match module.types[ty].inner {
        TypeInner::Scalar(s) if s.width == 4 => match s.kind {
            ScalarKind::Uint => Some("u32"),
            ScalarKind::Sint => Some("i32"),
            ScalarKind::Float => Some("f32"),
            _ => None,
        },
        _ => None,
    }
}

/// The uniform `params` of each module against the host's `#[repr(C)]` block: every
/// named (non-padding) field at the same offset with the same scalar type on both sides,
/// and the same size.
#[test]
fn params_blocks_match_the_shaders_layouts() {
    for shader in shaders() {
        let module = parse(&shader);
        let (name, rust) = (&shader.name, &shader.params);
        let params = module
            .global_variables
            .iter()
            .map(|(_, g)| g)
            .find(|g| g.name.as_deref() == Some("params"))
            .unwrap_or_else(|| panic!("{name}: no global `params`"));
        assert_eq!(params.space, AddressSpace::Uniform, "{name}: `params` is not uniform");
        let TypeInner::Struct { members, span } = &module.types[params.ty].inner else {
            panic!("{name}: `params` is not a struct")
        };
        assert_eq!(
            *span as usize, rust.size,
            "{name}: Params is {span} bytes, {} is {}",
            rust.rust, rust.size
        );
        for m in members {
            let member = m.name.as_deref().unwrap_or_default();
            if member.starts_with('_') {
                continue;
            }
            let field = rust
                .fields
                .iter()
                .find(|f| f.name == member)
                .unwrap_or_else(|| panic!("{name}: Params.{member} has no field in {}", rust.rust));
            assert_eq!(
                m.offset as usize, field.offset,
                "{name}: Params.{member} at {} but {}.{member} at {}",
                m.offset, rust.rust, field.offset
            );
            assert_eq!(
                wgsl_scalar(&module, m.ty),
                Some(field.ty),
                "{name}: Params.{member} and {}.{member} differ in type",
                rust.rust
            );
        }
        for f in rust.fields.iter().filter(|f| !f.name.starts_with('_')) {
            assert!(
                members.iter().any(|m| m.name.as_deref() == Some(f.name)),
                "{name}: {}.{} is not in the shader's Params",
                rust.rust,
                f.name
            );
        }
    }
}

/// Flag bits, gradient modes, `NO_INDEX`, the element width and the register cache: the
/// shader's `const` has the value the host sets or assumes.
#[test]
fn shared_constants_have_the_hosts_values() {
    let mut checked = 0;
    for shader in shaders() {
        let module = parse(&shader);
        for &(constant, value) in &shader.constants {
            let (_, c) = module
                .constants
                .iter()
                .find(|(_, c)| c.name.as_deref() == Some(constant))
                .unwrap_or_else(|| panic!("{}: no const {constant}", shader.name));
            let Expression::Literal(Literal::U32(wgsl)) = module.global_expressions[c.init] else {
                panic!("{}: {constant} is not a u32", shader.name)
            };
            assert_eq!(wgsl, value, "{}: {constant} is {wgsl} in WGSL, {value} on the host", shader.name);
            checked += 1;
        }
    }
    // 32 rows variants × 12 + backward 3 + reduce 1 + metrics 5 + soft 4 + binary 3 + convert 4 + row map 2,
    // and the linear head's GEMM in 2 loaders × 2 lanes × 6 (flags, tile capacity, loss flags).
    assert_eq!(checked, 32 * 12 + 22 + 4 * 6);
}

/// The pipeline constants the host sets are exactly the module's overrides (wgpu rejects
/// a constant the module lacks only when the pipeline is built).
#[test]
fn overrides_are_the_ones_the_host_sets() {
    for shader in shaders() {
        let module = parse(&shader);
        let wgsl: BTreeSet<_> = module.overrides.iter().filter_map(|(_, o)| o.name.as_deref()).collect();
        let host: BTreeSet<_> = shader.overrides.iter().copied().collect();
        assert_eq!(wgsl, host, "{}", shader.name);
    }
}

fn shaders_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders")
}

/// shaders/ holds WGSL only, and the library has every file of it.
#[test]
fn library_is_the_shaders_directory() {
    let mut on_disk = BTreeSet::new();
    for entry in std::fs::read_dir(shaders_dir()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let stem = name.strip_suffix(".wgsl").unwrap_or_else(|| panic!("shaders/{name} is not WGSL"));
        on_disk.insert(stem.to_string());
    }
    let library: BTreeSet<_> = LIBRARY.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(library, on_disk);
    for (name, text) in LIBRARY {
        let disk = std::fs::read_to_string(shaders_dir().join(format!("{name}.wgsl"))).unwrap();
        assert_eq!(*text, disk, "{name}");
    }
}

/// Every file's imports resolve, and every built module has each file once and no
/// directive left.
#[test]
fn every_import_resolves_once() {
    for (name, _) in LIBRARY {
        try_compose(LIBRARY, &[name]).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for shader in shaders() {
        assert!(!shader.source.lines().any(|l| l.trim_start().starts_with('#')), "{}", shader.name);
        for (file, _) in LIBRARY {
            let banner = format!("// ---- {file} ----\n");
            assert!(shader.source.matches(&banner).count() <= 1, "{}: {file} twice", shader.name);
        }
    }
}

const TOY: &[(&str, &str)] = &[
    ("top", "#import left\n  #import right\nfn top() {}\n"),
    ("left", "#import base\nfn left() {}\n"),
    ("right", "#import base\n#import top\nfn right() {}\n"),
    ("base", "enable f16;\nconst BASE: u32 = 1u;\n"),
    ("broken", "#import nowhere\n"),
    ("typo", "#include base\n"),
    ("two", "#import left right\n"),
];

#[test]
fn imports_come_first_and_once() {
    // A diamond with a cycle back to the root: each file once, imports before importers,
    // the `enable` at the top.
    let out = try_compose(TOY, &["top"]).unwrap();
    assert!(out.starts_with("enable f16;\n"), "{out}");
    assert_eq!(out.matches("enable f16;").count(), 1);
    assert_eq!(out.matches("const BASE").count(), 1);
    let at = |s: &str| out.find(s).unwrap_or_else(|| panic!("{s} missing from\n{out}"));
    assert!(
        at("const BASE") < at("fn left") && at("fn left") < at("fn right") && at("fn right") < at("fn top")
    );
    // Asking for a file twice, or for one already imported, adds nothing.
    assert_eq!(try_compose(TOY, &["top", "base", "top"]).unwrap(), out);
}

#[test]
fn a_missing_import_is_an_error_naming_both_files() {
    assert_eq!(
        try_compose(TOY, &["broken"]),
        Err(ComposeError::Missing { name: "nowhere".into(), from: "broken".into() })
    );
    let e = try_compose(TOY, &["nope"]).unwrap_err();
    assert_eq!(e, ComposeError::Missing { name: "nope".into(), from: String::new() });
    assert!(e.to_string().contains("shaders/nope.wgsl"), "{e}");
    let e = try_compose(TOY, &["broken"]).unwrap_err().to_string();
    assert!(e.contains("broken imports nowhere"), "{e}");
}

#[test]
fn a_line_that_is_not_one_import_is_an_error() {
    for (file, line) in [("typo", "#include base"), ("two", "#import left right")] {
        assert_eq!(
            try_compose(TOY, &[file]),
            Err(ComposeError::Malformed { line: line.into(), from: file.into() })
        );
    }
}

#[test]
#[should_panic(expected = "no shaders/no_such_file.wgsl")]
fn compose_panics_on_a_missing_file() {
    compose(&["no_such_file"]);
}

/// What the library shares is written once: the workgroup trees, tanh, the ignored-row
/// test and the flat workgroup index each live in one file.
#[test]
fn shared_code_is_written_once() {
    for (needle, home) in [
        ("stride = stride / 2u", &["part_tree", "workgroup_sum"][..]),
        ("21844.0 / 6081075.0", &["row_state"]),
        ("t < 0 ||", &["targets"]),
        ("wid.y *", &["workgroup"]),
        ("override WG", &["workgroup"]),
        // The GEMM's operand tiles are its own.
        ("var<workgroup>", &["gemm", "part_tree", "workgroup_sum"]),
        ("const GRAD_", &["grad_mode"]),
    ] {
        let found: Vec<_> = LIBRARY.iter().filter(|(_, t)| t.contains(needle)).map(|(n, _)| *n).collect();
        assert_eq!(found, home, "`{needle}`");
    }
}
