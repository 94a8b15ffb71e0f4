//! Tests named after a GPU path prove that path ran: each one traces the dispatches of
//! its call (`xent::gpu::trace`) and asserts the kernels, variants and dispatch shapes,
//! besides checking the values against the reference. Where an adapter lacks the feature
//! a path needs, the test says it skipped that adapter and names the feature.

mod common;

use xent::gpu::{Dispatch, Tuning, trace};
use xent::{
    Backend, GpuContext, Gradient, HalfFormat, Labels, Logits, LossOptions, LossOutput, Problem, synth,
};

/// The reference on the same values.
fn reference(logits: &[f32], v: usize, targets: &[i64], opts: &LossOptions) -> LossOutput {
    let problem = Problem::new(Logits::F32(logits), v, Labels::from(targets)).gradient(Gradient::Owned);
    xent::Reference.evaluate(problem, opts).unwrap()
}

/// The GPU's loss and gradient of f32 logits, with the dispatches it made.
fn traced(
    gpu: &GpuContext,
    logits: &[f32],
    v: usize,
    targets: &[i64],
    opts: &LossOptions,
) -> (LossOutput, Vec<Dispatch>) {
    let problem = Problem::new(Logits::F32(logits), v, Labels::from(targets)).gradient(Gradient::Owned);
    let (out, dispatches) = trace(|| gpu.evaluate(problem, opts));
    (out.unwrap(), dispatches)
}

fn assert_matches(got: &LossOutput, want: &LossOutput, what: &str) {
    xent::check::compare(got, want, xent::check::Tolerance::F32).unwrap_or_else(|e| panic!("{what}: {e}"));
}

fn kernels(dispatches: &[Dispatch]) -> Vec<&str> {
    dispatches.iter().map(|d| d.kernel.as_str()).collect()
}

fn context(gpu: &GpuContext, tuning: Tuning) -> GpuContext {
    pollster::block_on(GpuContext::from_adapter_tuned(&common::adapter_of(gpu), tuning)).unwrap()
}

#[test]
fn both_f16_readers_run_on_adapters_with_shader_f16() {
    let (n, v) = (24, 1000);
    let wide = synth::logits(n, v, 2.0, 81);
    let bits: Vec<u16> = wide.iter().map(|&x| HalfFormat::F16.from_f32(x)).collect();
    let exact: Vec<f32> = bits.iter().map(|&b| HalfFormat::F16.to_f32(b)).collect();
    let targets = synth::targets(n, v, 81);
    let opts = LossOptions::new();
    let want = reference(&exact, v, &targets, &opts);
    for gpu in common::gpus("both_f16_readers_run") {
        let native = gpu.device().features().contains(wgpu::Features::SHADER_F16);
        if !native {
            eprintln!("SKIPPED the native f16 reader on {}: the adapter lacks SHADER_F16", common::name(gpu));
        }
        for portable in [false, true] {
            let ctx = context(gpu, Tuning { portable_f16: portable, ..gpu.tuning() });
            let problem = Problem::new(Logits::Half(&bits, HalfFormat::F16), v, Labels::from(&targets))
                .gradient(Gradient::Owned);
            let (out, dispatches) = trace(|| ctx.evaluate(problem, &opts));
            let reader = if native && !portable { "native f16" } else { "portable f16" };
            let what = format!("{} with the {reader} reader", common::name(gpu));
            assert!(
                kernels(&dispatches)
                    .iter()
                    .any(|k| k.starts_with("cross_entropy_rows") && k.contains(reader)),
                "{what}: dispatched {:?}",
                kernels(&dispatches)
            );
            assert_matches(&out.unwrap(), &want, &what);
        }
    }
}

#[test]
fn subgroup_merge_runs_on_adapters_with_subgroups_and_the_tree_otherwise() {
    // Rows of 20000 classes: one row fills the workgroup with the GPU tuning.
    let (n, v) = (6, 20000);
    let logits = synth::logits(n, v, 2.0, 82);
    let targets = synth::targets(n, v, 82);
    let opts = LossOptions::new().label_smoothing(0.1);
    let want = reference(&logits, v, &targets, &opts);
    for gpu in common::gpus("subgroup_merge_runs") {
        let has = gpu.device().features().contains(wgpu::Features::SUBGROUP);
        if !has {
            eprintln!("SKIPPED the subgroup merge on {}: the adapter lacks SUBGROUP", common::name(gpu));
        }
        for subgroups in [true, false] {
            let ctx = context(gpu, Tuning { subgroups, few_rows: 0, ..Tuning::GPU });
            let (out, dispatches) = traced(&ctx, &logits, v, &targets, &opts);
            let merge = if subgroups && has { "subgroup merge" } else { "workgroup merge" };
            let what = format!("{} with the {merge}", common::name(gpu));
            assert!(
                kernels(&dispatches).iter().any(|k| k.starts_with("cross_entropy_rows") && k.contains(merge)),
                "{what}: dispatched {:?}",
                kernels(&dispatches)
            );
            assert_matches(&out, &want, &what);
        }
    }
}

#[test]
fn rows_longer_than_a_binding_stream_in_column_pieces() {
    let gpus = common::gpus("rows_longer_than_a_binding");
    let Some(tiny) = common::tiny_device(gpus) else { return };
    // 40000 f32 = 160 KB per row against a 64 KiB binding: three pieces a row.
    let (n, v) = (3, 40000);
    let logits = synth::logits(n, v, 2.0, 83);
    let targets = synth::targets(n, v, 83);
    let opts = LossOptions::new();
    let (out, dispatches) = traced(&tiny, &logits, v, &targets, &opts);
    let k = kernels(&dispatches);
    assert!(k.contains(&"row_partials") && k.contains(&"merge_partials"), "dispatched {k:?}");
    assert!(k.contains(&"cross_entropy_backward"), "the gradient of split rows: {k:?}");
    assert!(!k.iter().any(|k| k.starts_with("cross_entropy_rows")), "no whole-row kernel: {k:?}");
    assert_eq!(k.iter().filter(|k| **k == "row_partials").count(), n * 3, "three pieces a row: {k:?}");
    assert_matches(&out, &reference(&logits, v, &targets, &opts), "split rows");
}

#[test]
fn dispatches_beyond_the_dimension_limit_fold_into_2d() {
    let gpus = common::gpus("dispatches_fold_into_2d");
    let Some(tiny) = common::tiny_device(gpus) else { return };
    // At most 7 workgroups a dimension on this device: 700 rows need more than 7 x 1.
    let (n, v) = (700, 40);
    let logits = synth::logits(n, v, 2.0, 84);
    let targets = synth::targets(n, v, 84);
    let opts = LossOptions::new();
    let (out, dispatches) = traced(&tiny, &logits, v, &targets, &opts);
    assert!(dispatches.iter().all(|d| d.groups[0] <= 7 && d.groups[1] <= 7), "{dispatches:?}");
    assert!(dispatches.iter().any(|d| d.groups[1] > 1), "no dispatch folded into 2D: {dispatches:?}");
    assert_matches(&out, &reference(&logits, v, &targets, &opts), "2D dispatches");
}

#[test]
fn few_long_rows_take_the_row_grid_and_many_rows_the_fused_kernel() {
    let (n, v) = (2, 65536);
    let logits = synth::logits(n, v, 2.0, 85);
    let targets = synth::targets(n, v, 85);
    let opts = LossOptions::new();
    let want = reference(&logits, v, &targets, &opts);
    for gpu in common::gpus("few_long_rows_take_the_row_grid") {
        for few_rows in [64, 0] {
            let ctx = context(gpu, Tuning { few_rows, ..gpu.tuning() });
            let (out, dispatches) = traced(&ctx, &logits, v, &targets, &opts);
            let k = kernels(&dispatches);
            let grid = k.contains(&"row_partials") && k.contains(&"merge_partials");
            let fused = k.iter().any(|k| k.starts_with("cross_entropy_rows"));
            let what = format!("{} with few_rows {few_rows}: {k:?}", common::name(gpu));
            assert_eq!((grid, fused), (few_rows > 0, few_rows == 0), "{what}");
            if grid {
                // One workgroup per (row, 4096-column block).
                let partials = dispatches.iter().find(|d| d.kernel == "row_partials").unwrap();
                assert_eq!(partials.groups[0] * partials.groups[1], (n * v / 4096) as u32, "{what}");
            }
            assert_matches(&out, &want, &what);
        }
    }
}

#[test]
fn vec4_loads_for_multiples_of_four_classes_and_scalar_loads_otherwise() {
    for gpu in common::gpus("vec4_loads") {
        for (v, variant) in [(1000, "vec4"), (1001, "f32")] {
            let logits = synth::logits(9, v, 2.0, 86);
            let targets = synth::targets(9, v, 86);
            let opts = LossOptions::new();
            let (out, dispatches) = traced(gpu, &logits, v, &targets, &opts);
            let prefix = format!("cross_entropy_rows ({variant},");
            assert!(
                kernels(&dispatches).iter().any(|k| k.starts_with(&prefix)),
                "{} V={v}: dispatched {:?}",
                common::name(gpu),
                kernels(&dispatches)
            );
            assert_matches(&out, &reference(&logits, v, &targets, &opts), &format!("V={v}"));
        }
    }
}
