//! The linear head on every GPU adapter against the f64 reference (`xent::Reference`),
//! through the front door: every option alone and combined, the reductions, `n_items`,
//! ignored rows, bias or none, half inputs, backwards from a saved LSE, several row
//! chunks, W in pieces on a tiny-limit device, the 4096 × 32000 head under an 8 MiB
//! budget, and bit-identical repeats.
//!
//! Tolerances (u = 2⁻²⁴, f32 accumulation against an f64 reference):
//! - Losses: `|Δ| ≤ 1e-5·|ref| + 1e-6`, as for plain logits.
//! - Logits: `x = Σ_k h_k W_k + b` summed in f32 over D terms in a fixed order has
//!   `|Δx| ≤ ε_x = (D + 1)·u·(D·max|h|·max|W| + max|b|)` (the recursive-sum bound γ_n ≤
//!   n·u/(1 − n·u) with n = D + 1 terms of at most that magnitude).
//! - G: per row, the softmax moves by `|Δp_v| ≤ 2·p_v·ε_x` (its Jacobian `p ⊙ (Δx − pᵀΔx)`),
//!   and the kernel's own rounding is a few u per element, so `Σ_v |ΔG_rv| ≤ s_r·κ·(2ε_x
//!   + 8u)` with `s_r` the row's gradient scale (1/denominator for `mean`, 1 for `sum`,
//!   the upstream for a backward) and κ the options' bound on `Σ_v |∂ℓ/∂z_v|` and
//!   `dz/dx` (2 for the plain loss; × max class weight, × logit scale, + the z-loss term).
//! - dh = G W (length V): `|Δdh_rk| ≤ max|W|·s_r·κ·(2ε_x + 8u) + γ_V·Σ_v |G_rv||W_vk| ≤
//!   max|W|·s_r·κ·(2ε_x + 8u + V·u)`, since `Σ_v |G_rv| ≤ s_r·κ`.
//! - dW = Gᵀ h and db = Σ_r G (length N): the same with max|h| (1 for db) and Σ_r s_r in
//!   place of s_r, and N·u for the f32 sums over rows (inside a chunk and over chunks).
//!
//! These are worst-case bounds; a wrong piece, chunk, scale or option misses them by
//! orders of magnitude.

mod common;

use common::head::{Head, bounds, check, head, loss_close};

use xent::gpu::{GpuContext, trace};
use xent::{
    Backend, Gradient, GradientTo, HalfFormat, HeadGradients, LinearHead, LossOptions, LossOutput, Problem,
    Reduction, Reference, Upstream, Values,
};

/// Every output the head gives, owned, with row losses and LSE.
fn problem<'a>(hd: &'a Head, bias: bool) -> Problem<'a> {
    Problem::linear(hd.linear(bias), &hd.t[..]).gradient(Gradient::Owned).lse(true).row_losses(true)
}

fn option_sets(v: usize) -> Vec<(&'static str, LossOptions, f64)> {
    let weights: Vec<f32> = (0..v).map(|c| 0.5 + (c % 5) as f32 * 0.25).collect();
    vec![
        ("plain", LossOptions::new(), 2.0),
        ("smoothing", LossOptions::new().label_smoothing(0.1), 2.0),
        ("weights", LossOptions::new().weights(weights.clone()), 2.0),
        ("z-loss", LossOptions::new().z_loss(1e-3), 2.0 + 2e-3 * 20.0),
        ("softcap", LossOptions::new().softcap(5.0), 2.0),
        ("scale", LossOptions::new().logit_scale(0.7), 2.0),
        (
            "all",
            LossOptions::new()
                .weights(weights)
                .label_smoothing(0.1)
                .z_loss(1e-3)
                .softcap(8.0)
                .logit_scale(1.3),
            2.0 * 1.3 + 2e-3 * 20.0,
        ),
    ]
}

#[test]
fn every_option_and_reduction_matches_the_reference() {
    let gpus = common::gpus("every_option_and_reduction_matches_the_reference");
    // D 20 and V 37: scalar loads; D 32 and V 100: vec4 loads.
    for (n, d, v) in [(70, 20, 37), (150, 32, 100)] {
        let hd = head(n, d, v, 1);
        for (name, base, kappa) in option_sets(v) {
            for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                let opts = base.clone().reduction(reduction);
                let bias = reduction != Reduction::Sum;
                let want = Reference.evaluate(problem(&hd, bias), &opts).unwrap();
                let b = bounds(&hd, bias, &opts, kappa, 1.0);
                for gpu in gpus {
                    let got = gpu.evaluate(problem(&hd, bias), &opts).unwrap();
                    check(
                        &common::name(gpu),
                        &got,
                        &want,
                        &hd,
                        &b,
                        &format!("{n}x{d}x{v} {name} {reduction:?} bias {bias}"),
                    );
                }
            }
        }
        // n_items.
        let opts = LossOptions::new().n_items(1000.0).z_loss(1e-3);
        let want = Reference.evaluate(problem(&hd, true), &opts).unwrap();
        // bounds() takes the n_items denominator: s = 1/1000 per row.
        let b = bounds(&hd, true, &opts, 2.1, 1.0);
        for gpu in gpus {
            let got = gpu.evaluate(problem(&hd, true), &opts).unwrap();
            check(&common::name(gpu), &got, &want, &hd, &b, "n_items");
        }
    }
}

#[test]
fn ignored_rows_and_an_all_ignored_batch() {
    let gpus = common::gpus("ignored_rows_and_an_all_ignored_batch");
    let mut hd = head(40, 12, 30, 3);
    for (r, t) in hd.t.iter_mut().enumerate() {
        if r % 3 == 0 {
            *t = -100;
        }
    }
    let opts = LossOptions::new().label_smoothing(0.05);
    let want = Reference.evaluate(problem(&hd, true), &opts).unwrap();
    let b = bounds(&hd, true, &opts, 2.0, 1.0);
    for gpu in gpus {
        let got = gpu.evaluate(problem(&hd, true), &opts).unwrap();
        check(&common::name(gpu), &got, &want, &hd, &b, "ignored rows");
        let dh = got.grad_hidden.unwrap();
        assert!(dh[..hd.d].iter().all(|&x| x == 0.0), "an ignored row's dh is 0");
    }
    hd.t.iter_mut().for_each(|t| *t = -100);
    for reduction in [Reduction::Mean, Reduction::Sum] {
        let opts = LossOptions::new().reduction(reduction);
        let want = Reference.evaluate(problem(&hd, true), &opts).unwrap();
        for gpu in gpus {
            let got = gpu.evaluate(problem(&hd, true), &opts).unwrap();
            loss_close("all ignored", got.loss, want.loss, 0.0);
            assert!(got.grad_weight.unwrap().iter().all(|&x| x == 0.0));
            assert!(got.grad_bias.unwrap().iter().all(|&x| x == 0.0));
        }
    }
}

#[test]
fn half_inputs_are_widened_once() {
    let gpus = common::gpus("half_inputs_are_widened_once");
    let hd = head(60, 16, 48, 4);
    for format in [HalfFormat::F16, HalfFormat::Bf16] {
        let hh: Vec<u16> = hd.h.iter().map(|&x| format.from_f32(x)).collect();
        let wh: Vec<u16> = hd.w.iter().map(|&x| format.from_f32(x)).collect();
        let bh: Vec<u16> = hd.b.iter().map(|&x| format.from_f32(x)).collect();
        // The same head in f32 holds the rounded values exactly: the bounds are the f32 ones.
        let wide = Head {
            h: hh.iter().map(|&x| format.to_f32(x)).collect(),
            w: wh.iter().map(|&x| format.to_f32(x)).collect(),
            b: bh.iter().map(|&x| format.to_f32(x)).collect(),
            t: hd.t.clone(),
            ..hd
        };
        let opts = LossOptions::new().z_loss(1e-4);
        let head = || {
            LinearHead::new(Values::Half(&hh, format), Values::Half(&wh, format), hd.d)
                .bias(Values::Half(&bh, format))
        };
        let want =
            Reference.evaluate(Problem::linear(head(), &hd.t[..]).gradient(Gradient::Owned), &opts).unwrap();
        let b = bounds(&wide, true, &opts, 2.1, 1.0);
        for gpu in gpus {
            let got =
                gpu.evaluate(Problem::linear(head(), &hd.t[..]).gradient(Gradient::Owned), &opts).unwrap();
            check(&common::name(gpu), &got, &want, &wide, &b, &format!("{format:?}"));
        }
    }
}

/// dh, dW and db of a backward from `lse` on `backend`, into the caller's slices (no loss).
fn backward_into_slices(
    backend: &dyn Backend,
    hd: &Head,
    lse: &[f32],
    upstream: Upstream<'_>,
    opts: &LossOptions,
) -> LossOutput {
    let (mut dh, mut dw, mut db) = (vec![0.0f32; hd.n * hd.d], vec![0.0f32; hd.v * hd.d], vec![0.0f32; hd.v]);
    let grads = HeadGradients {
        hidden: GradientTo::IntoF32(&mut dh),
        weight: GradientTo::IntoF32(&mut dw),
        bias: GradientTo::IntoF32(&mut db),
    };
    let p = Problem::linear(hd.linear(true), &hd.t[..])
        .gradient(Gradient::Linear(grads))
        .backward(Some(lse), upstream);
    let out = backend.evaluate(p, opts).unwrap();
    assert!(out.loss.is_none());
    LossOutput { grad_hidden: Some(dh), grad_weight: Some(dw), grad_bias: Some(db), ..Default::default() }
}

#[test]
fn backward_from_the_saved_lse_with_scalar_and_per_row_upstream() {
    let gpus = common::gpus("backward_from_the_saved_lse_with_scalar_and_per_row_upstream");
    let hd = head(90, 24, 64, 5);
    for (reduction, per_row) in [(Reduction::Mean, false), (Reduction::None, true)] {
        let opts = LossOptions::new().reduction(reduction).label_smoothing(0.1).z_loss(1e-3);
        let fused = Reference.evaluate(Problem::linear(hd.linear(true), &hd.t[..]).lse(true), &opts).unwrap();
        let lse = fused.lse.unwrap();
        let up: Vec<f32> = (0..hd.n).map(|r| 0.5 + (r % 10) as f32 * 0.15).collect();
        let upstream = if per_row { Upstream::PerRow(&up) } else { Upstream::Scalar(1.7) };
        let run = |backend: &dyn Backend| backward_into_slices(backend, &hd, &lse, upstream, &opts);
        let want = run(&Reference);
        // The saved f32 LSE adds |p|·ulp(lse) ≈ 1e-7 relative to G: inside 8u.
        let b = bounds(&hd, true, &opts, 2.1, 2.0);
        for gpu in gpus {
            let got = run(gpu);
            check(
                &common::name(gpu),
                &got,
                &want,
                &hd,
                &b,
                &format!("backward {reduction:?} per_row {per_row}"),
            );
        }
    }
}

/// Runs `work` on a context of `gpu`'s adapter with the memory budget `budget`.
fn with_budget(gpu: &GpuContext, budget: u64) -> GpuContext {
    let adapter = common::adapter_of(gpu);
    let mut ctx = pollster::block_on(GpuContext::from_adapter_tuned(&adapter, gpu.tuning())).unwrap();
    ctx.set_memory_budget(budget);
    ctx
}

#[test]
fn linear_head_runs_the_gemm_the_row_kernel_and_the_products_per_row_chunk() {
    let gpus = common::gpus("linear_head_runs_the_gemm_the_row_kernel_and_the_products_per_row_chunk");
    let hd = head(500, 32, 256, 6);
    let opts = LossOptions::new();
    let want = Reference.evaluate(problem(&hd, true), &opts).unwrap();
    let b = bounds(&hd, true, &opts, 2.0, 1.0);
    for gpu in gpus {
        // 64 KiB: well under the 500 rows' 512 KB of logits.
        let ctx = with_budget(gpu, 64 << 10);
        let (got, dispatches) = trace(|| ctx.evaluate(problem(&hd, true), &opts));
        check(&common::name(gpu), &got.unwrap(), &want, &hd, &b, "row chunks");
        let count = |needle: &str| dispatches.iter().filter(|d| d.kernel.contains(needle)).count();
        let chunks = count("cross_entropy_rows");
        assert!(chunks >= 5, "{chunks} chunks: {dispatches:?}");
        assert_eq!(count("gemm (nt, vec4"), chunks, "logits by the vec4 GEMM, once per chunk");
        assert_eq!(count("gemm (nn, vec4"), chunks, "dh per chunk");
        assert_eq!(count("gemm (tn, vec4"), chunks, "dW per chunk");
        assert_eq!(count("linear_colsum"), chunks, "db per chunk");
    }
}

/// The GEMM tile follows the adapter: the broadcast tile (16 rows an invocation, shared by
/// subgroup broadcasts) on CPU adapters whose subgroups are 8 lanes, for all three
/// products (logits `nt`, dh `nn`, dW `tn`), with ragged rows, columns and K, both
/// loaders, and a backward that recomputes the logits; the other tiles elsewhere.
#[test]
fn gemm_tile_follows_the_adapter_and_matches_the_reference() {
    let gpus = common::gpus("gemm_tile_follows_the_adapter_and_matches_the_reference");
    let opts = LossOptions::new().label_smoothing(0.1).z_loss(1e-3);
    // N not a multiple of 16, V not of 128; D 36 (vec4 loads) and 35 (scalar loads).
    for (n, d, v) in [(53, 36, 300), (37, 35, 131)] {
        let hd = head(n, d, v, 11);
        let want = Reference.evaluate(problem(&hd, true), &opts).unwrap();
        let b = bounds(&hd, true, &opts, 2.0 + 2e-3 * 20.0, 1.0);
        for gpu in gpus {
            let info = gpu.adapter_info();
            let broadcast = info.device_type == wgpu::DeviceType::Cpu
                && info.subgroup_min_size == 8
                && info.subgroup_max_size == 8
                && gpu.device().features().contains(wgpu::Features::SUBGROUP)
                && std::env::var_os("XENT_GEMM_TILE").is_none();
            let (got, dispatches) = trace(|| gpu.evaluate(problem(&hd, true), &opts));
            let what = format!("{n}x{d}x{v}, broadcast tile {broadcast}");
            check(&common::name(gpu), &got.unwrap(), &want, &hd, &b, &what);
            for product in ["gemm (nt", "gemm (nn", "gemm (tn"] {
                let tiles: Vec<&str> = dispatches
                    .iter()
                    .filter(|d| d.kernel.starts_with(product))
                    .map(|d| d.kernel.as_str())
                    .collect();
                assert!(!tiles.is_empty(), "{what}: no {product}: {dispatches:?}");
                assert!(tiles.iter().all(|k| k.contains("broadcast") == broadcast), "{what}: {tiles:?}");
            }
            // A backward from the saved LSE recomputes the logits through the same tile.
            let lse = want.lse.clone().unwrap();
            let run = |backend: &dyn Backend| {
                backward_into_slices(backend, &hd, &lse, Upstream::Scalar(0.5), &opts)
            };
            let (got, dispatches) = trace(|| run(gpu));
            check(
                &common::name(gpu),
                &got,
                &run(&Reference),
                &hd,
                &bounds(&hd, true, &opts, 2.1, 0.5),
                &what,
            );
            let logits = dispatches.iter().filter(|d| d.kernel.starts_with("gemm (nt")).count();
            assert!(logits > 0, "{what}: the backward recomputes the logits: {dispatches:?}");
        }
        if gpus.iter().all(|g| g.adapter_info().subgroup_max_size != 8) {
            eprintln!("gemm tile: no adapter with 8-lane subgroups here, the broadcast tile did not run");
        }
    }
}

#[test]
fn tiny_limits_bind_w_in_pieces_and_fold_dispatches() {
    let gpus = common::gpus("tiny_limits_bind_w_in_pieces_and_fold_dispatches");
    let Some(tiny) = common::tiny_device(gpus) else { return };
    // W is 1000 × 32 f32 = 128 KB over 64 KiB bindings: 2 pieces or more, each of at
    // least 8 GEMM tiles along V whatever the adapter's tile (up to 64 columns): more
    // workgroups than the 7 a dimension allows.
    let hd = head(300, 32, 1000, 7);
    let opts = LossOptions::new().label_smoothing(0.1).reduction(Reduction::Sum);
    let want = Reference.evaluate(problem(&hd, true), &opts).unwrap();
    let b = bounds(&hd, true, &opts, 2.0, 1.0);
    let (got, dispatches) = trace(|| tiny.evaluate(problem(&hd, true), &opts));
    check(&common::name(&tiny), &got.unwrap(), &want, &hd, &b, "tiny limits");
    let chunks = dispatches.iter().filter(|d| d.kernel.contains("cross_entropy_rows")).count();
    let logits = dispatches.iter().filter(|d| d.kernel.starts_with("gemm (nt")).count();
    assert!(logits >= 2 * chunks, "W in pieces: {logits} logits GEMMs for {chunks} chunks");
    assert!(dispatches.iter().all(|d| d.groups[0] <= 7 && d.groups[1] <= 7), "{dispatches:?}");
    assert!(dispatches.iter().any(|d| d.groups[1] > 1), "some dispatch folds into 2D");
}

#[test]
fn repeats_are_bit_identical() {
    let gpus = common::gpus("repeats_are_bit_identical");
    let hd = head(333, 40, 200, 8);
    let opts = LossOptions::new().z_loss(1e-3).label_smoothing(0.1);
    for gpu in gpus {
        let ctx = with_budget(gpu, 96 << 10);
        let a = ctx.evaluate(problem(&hd, true), &opts).unwrap();
        let b = ctx.evaluate(problem(&hd, true), &opts).unwrap();
        let bits = |o: &LossOutput| {
            let mut all = vec![o.loss.unwrap().to_bits()];
            for v in [&o.grad_hidden, &o.grad_weight, &o.grad_bias, &o.lse] {
                all.extend(v.as_ref().unwrap().iter().map(|x| x.to_bits()));
            }
            all
        };
        assert_eq!(bits(&a), bits(&b), "{}", common::name(gpu));
    }
}

#[test]
fn a_4096_by_32000_head_in_an_8_mib_budget() {
    let gpus = common::gpus("a_4096_by_32000_head_in_an_8_mib_budget");
    if gpus.is_empty() {
        return;
    }
    // D = 16 keeps the products (2·N·V·D = 4.2 GFLOP forward) within a CI run on a
    // software adapter; the logits are 512 MB whatever D is.
    let hd = head(4096, 16, 32000, 9);
    let opts = LossOptions::new();
    let want = Reference.evaluate(problem(&hd, true), &opts).unwrap();
    let b = bounds(&hd, true, &opts, 2.0, 1.0);
    for gpu in gpus {
        let ctx = with_budget(gpu, 8 << 20);
        let (got, dispatches) = trace(|| ctx.evaluate(problem(&hd, true), &opts));
        check(&common::name(gpu), &got.unwrap(), &want, &hd, &b, "4096 x 32000");
        let chunks = dispatches.iter().filter(|d| d.kernel.contains("cross_entropy_rows")).count();
        assert!(chunks >= 64, "{chunks} chunks of at most 8 MiB");
    }
}

/// Repeated calls of one shape create no buffer: the head's buffers live in the
/// context's workspace (the allocation counter, as for the host path).
#[test]
fn repeated_linear_calls_create_no_buffer() {
    for shared in common::gpus("repeated_linear_calls_create_no_buffer") {
        // A context of its own: the shared ones serve the other tests at the same time.
        let gpu = &with_budget(shared, 1 << 30);
        let hd = head(70, 12, 300, 5);
        let opts = LossOptions::new().label_smoothing(0.1);
        let first = gpu.evaluate(problem(&hd, true), &opts).unwrap();
        let before = gpu.buffer_allocations();
        assert!(before > 0, "{}: the first call created its buffers", common::name(gpu));
        for _ in 0..3 {
            let again = gpu.evaluate(problem(&hd, true), &opts).unwrap();
            assert_eq!(again.loss, first.loss, "{}", common::name(gpu));
        }
        assert_eq!(
            gpu.buffer_allocations(),
            before,
            "{}: no new buffer on repeated calls",
            common::name(gpu)
        );
    }
}

/// The loss alone takes the partials path: the GEMM's epilogue reduces each tile of
/// logits to per-row parts and `merge_partials` combines them; no fused row kernel, no
/// products from G, the loss and LSE against the reference.
#[test]
fn the_loss_alone_is_reduced_in_the_gemm_epilogue() {
    let gpus = common::gpus("the_loss_alone_is_reduced_in_the_gemm_epilogue");
    let hd = head(300, 20, 700, 11);
    let opts = LossOptions::new().label_smoothing(0.1).z_loss(1e-3).softcap(5.0);
    let p = || Problem::linear(hd.linear(true), &hd.t[..]).lse(true).row_losses(true);
    let want = Reference.evaluate(p(), &opts).unwrap();
    let b = bounds(&hd, true, &opts, 2.0, 1.0);
    for gpu in gpus {
        let ctx = with_budget(gpu, 64 << 10);
        let (got, dispatches) = trace(|| ctx.evaluate(p(), &opts));
        check(&common::name(gpu), &got.unwrap(), &want, &hd, &b, "partials");
        let count = |needle: &str| dispatches.iter().filter(|d| d.kernel.contains(needle)).count();
        let chunks = count("merge_partials");
        assert!(chunks >= 2, "{chunks} chunks: {dispatches:?}");
        assert_eq!(count(") partials"), chunks, "one partials GEMM per chunk: {dispatches:?}");
        assert_eq!(count("cross_entropy_rows") + count(") grad") + count("gemm (nn") + count("gemm (tn"), 0);
    }
}

/// Rows longer than one storage binding (20000 logits over a 64 KiB binding) with
/// gradients take the recompute path: the partials forward, then per piece of W the
/// GEMM's `grad` epilogue forms G from the recomputed logits, then the piece's products.
#[test]
fn rows_beyond_one_binding_recompute_g_per_piece() {
    let gpus = common::gpus("rows_beyond_one_binding_recompute_g_per_piece");
    let Some(tiny) = common::tiny_device(gpus) else { return };
    let hd = head(40, 8, 20000, 12);
    let opts = LossOptions::new().label_smoothing(0.05).reduction(Reduction::Sum);
    let want = Reference.evaluate(problem(&hd, true), &opts).unwrap();
    let b = bounds(&hd, true, &opts, 2.0, 1.0);
    let (got, dispatches) = trace(|| tiny.evaluate(problem(&hd, true), &opts));
    check(&common::name(&tiny), &got.unwrap(), &want, &hd, &b, "recompute");
    let count = |needle: &str| dispatches.iter().filter(|d| d.kernel.contains(needle)).count();
    let chunks = count("merge_partials");
    assert!(chunks >= 1 && count("cross_entropy_rows") == 0, "{dispatches:?}");
    // W (20000 × 8 f32 = 640 KB) in pieces of at most 64 KiB: G, dh and dW per piece and
    // chunk (dispatches: a product may take several within the 7-workgroup limit).
    for kernel in [") grad", "gemm (nn", "gemm (tn"] {
        assert!(count(kernel) >= 10 * chunks, "{kernel}: {} dispatches for {chunks} chunks", count(kernel));
    }
}

/// A backward from the saved LSE forms G in the GEMM's epilogue: no logits buffer, no
/// backward kernel over stored logits.
#[test]
fn a_backward_forms_g_in_the_gemm_epilogue() {
    let gpus = common::gpus("a_backward_forms_g_in_the_gemm_epilogue");
    let hd = head(64, 16, 300, 13);
    let opts = LossOptions::new();
    let lse = Reference
        .evaluate(Problem::linear(hd.linear(false), &hd.t[..]).lse(true), &opts)
        .unwrap()
        .lse
        .unwrap();
    let p = || {
        Problem::linear(hd.linear(false), &hd.t[..])
            .gradient(Gradient::Owned)
            .backward(Some(&lse), Upstream::Scalar(1.0))
    };
    let want = Reference.evaluate(p(), &opts).unwrap();
    let b = bounds(&hd, false, &opts, 2.1, 1.0);
    for gpu in gpus {
        let (got, dispatches) = trace(|| gpu.evaluate(p(), &opts));
        check(&common::name(gpu), &got.unwrap(), &want, &hd, &b, "backward");
        let count = |needle: &str| dispatches.iter().filter(|d| d.kernel.contains(needle)).count();
        assert!(count(") grad") >= 1, "{dispatches:?}");
        assert_eq!(
            count("cross_entropy_backward") + count("cross_entropy_rows") + count("merge_partials"),
            0
        );
    }
}

/// dW larger than the staging buffer (here 5.2 MB over 4 MiB) comes back in pieces
/// through it, in the right places.
#[test]
fn dw_comes_back_in_pieces_through_the_staging_buffer() {
    let gpus = common::gpus("dw_comes_back_in_pieces_through_the_staging_buffer");
    let hd = head(8, 160, 8192, 14);
    let opts = LossOptions::new().reduction(Reduction::Sum);
    let want = Reference.evaluate(problem(&hd, true), &opts).unwrap();
    let b = bounds(&hd, true, &opts, 2.0, 1.0);
    for gpu in gpus {
        let ctx = with_budget(gpu, 8 << 20);
        let got = ctx.evaluate(problem(&hd, true), &opts).unwrap();
        check(&common::name(gpu), &got, &want, &hd, &b, "staged dW");
    }
}

/// Products longer than `GEMM_MAX_K` along K (dh: K = V = 40000, one float per load at
/// D = 1; dW: K = the chunk's 20000 rows) are split into dispatches that accumulate:
/// CPU adapters cut a loop nest short after 65535 iterations without a word.
#[test]
fn long_products_are_split_along_k() {
    let gpus = common::gpus("long_products_are_split_along_k");
    for (n, d, v) in [(3, 1, 40000), (20000, 4, 40)] {
        let hd = head(n, d, v, 15);
        let opts = LossOptions::new().reduction(Reduction::Sum);
        let want = Reference.evaluate(problem(&hd, true), &opts).unwrap();
        let b = bounds(&hd, true, &opts, 2.0, 1.0);
        for gpu in gpus {
            let (got, dispatches) = trace(|| gpu.evaluate(problem(&hd, true), &opts));
            check(&common::name(gpu), &got.unwrap(), &want, &hd, &b, &format!("{n}x{d}x{v}"));
            let product = if n > v { "gemm (tn" } else { "gemm (nn" };
            let count = dispatches.iter().filter(|d| d.kernel.starts_with(product)).count();
            assert!(count >= 2, "{product}: K in segments, {count} dispatches");
        }
    }
}

/// db over a chunk of 200000 rows: `linear_colsum` sums them in dispatches of at most
/// 120000 rows (CPU adapters stopped its loop at 131070 rows: db came out 0.655 of the
/// sum, within the worst-case bound of `check` at this size, so the sum is compared
/// here as a sum: to 1e-4 of the largest |db|, five times the random-walk error
/// √(N/2)·u of the f32 sum in pairs; the dropped rows would be 0.35 of it).
#[test]
fn db_sums_every_row_of_a_long_chunk() {
    let gpus = common::gpus("db_sums_every_row_of_a_long_chunk");
    let hd = head(200000, 1, 8, 3);
    let opts = LossOptions::new().reduction(Reduction::Sum);
    let want = Reference.evaluate(problem(&hd, true), &opts).unwrap().grad_bias.unwrap();
    let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    for gpu in gpus {
        let got = gpu.evaluate(problem(&hd, true), &opts).unwrap().grad_bias.unwrap();
        for (c, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-4 * scale, "{}: db[{c}] {g} vs {w}", common::name(gpu));
        }
    }
}
