//! Shared by the GPU test binaries: one context per adapter, opened once per binary.
#![allow(dead_code)]

pub mod cli;
pub mod head;

use std::sync::OnceLock;

use xent::GpuContext;

/// Every adapter of the machine (or those whose name contains `XENT_ADAPTER`), each with
/// a context. Empty only when the user opted out with `XENT_SKIP_GPU=1`; with no
/// adapter and no opt-out the test fails and says how to get one.
///
/// The contexts take the adapter's tuning with the (row × column block) grid on for
/// batches under 64 rows, as on GPUs: CPU adapters turn it off by default, and the tests
/// reach every path through their shapes (whole rows through 64 rows and more, the
/// grid through fewer; `every_kernel_tuning_passes_the_conformance_set` and `xent check`
/// run the default tunings).
pub fn gpus(test: &str) -> &'static [GpuContext] {
    static GPUS: OnceLock<Vec<GpuContext>> = OnceLock::new();
    let gpus = GPUS.get_or_init(|| {
        if std::env::var("XENT_SKIP_GPU").is_ok_and(|v| v == "1") {
            return Vec::new();
        }
        let filter = std::env::var("XENT_ADAPTER").ok();
        let adapters = match xent::gpu::select_adapters(filter.as_deref()) {
            Ok(a) => a,
            Err(e) => panic!(
                "{e}\nThe GPU tests need an adapter: on Debian/Ubuntu run \
                 `apt-get install mesa-vulkan-drivers` (Mesa's lavapipe, a software Vulkan driver). \
                 To skip the GPU tests explicitly, set XENT_SKIP_GPU=1."
            ),
        };
        adapters
            .iter()
            .map(|a| {
                pollster::block_on(GpuContext::from_adapter_tuned(a, grid_on(a)))
                    .unwrap_or_else(|e| panic!("opening {}: {e}", a.get_info().name))
            })
            .collect()
    });
    if gpus.is_empty() {
        eprintln!("SKIPPED {test}: XENT_SKIP_GPU=1 (no GPU test ran)");
    }
    gpus
}

/// The adapter's tuning with the row grid on for batches under 64 rows (see [`gpus`]).
pub fn grid_on(adapter: &wgpu::Adapter) -> xent::gpu::Tuning {
    let tuning = xent::gpu::Tuning::for_adapter(&adapter.get_info());
    xent::gpu::Tuning { few_rows: tuning.few_rows.max(64), ..tuning }
}

/// Name of a context for failure messages.
pub fn name(gpu: &GpuContext) -> String {
    let i = gpu.adapter_info();
    format!("{} ({:?})", i.name, i.backend)
}

/// A fresh adapter handle for the adapter a context runs on (to open another device).
pub fn adapter_of(gpu: &GpuContext) -> wgpu::Adapter {
    let info = gpu.adapter_info();
    xent::gpu::select_adapters(None)
        .unwrap()
        .into_iter()
        .find(|a| a.get_info().name == info.name && a.get_info().backend == info.backend)
        .unwrap()
}

/// A context on the first adapter, its device opened with tiny limits: a 64 KiB binding
/// and at most 7 workgroups per dispatch dimension.
pub fn tiny_device(gpus: &[GpuContext]) -> Option<GpuContext> {
    let adapter = adapter_of(gpus.first()?);
    let mut limits = adapter.limits();
    limits.max_storage_buffer_binding_size = 64 << 10;
    limits.max_compute_workgroups_per_dimension = 7;
    let (device, queue) = pollster::block_on(
        adapter.request_device(&wgpu::DeviceDescriptor { required_limits: limits, ..Default::default() }),
    )
    .unwrap();
    let gpu = GpuContext::from_device_tuned(device, queue, grid_on(&adapter)).unwrap();
    assert_eq!(gpu.limits().max_compute_workgroups_per_dimension, 7);
    Some(gpu)
}

/// Probability targets (each row a softmax of `u`) and binary targets (0/1 from the sign
/// of `u`, 0.3 at every third element) [rows, classes] from the values `u`.
pub fn dense_targets(u: &[f32], classes: usize) -> (Vec<f32>, Vec<f32>) {
    let mut probs = vec![0.0f32; u.len()];
    for (p, row) in probs.chunks_mut(classes).zip(u.chunks(classes)) {
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = row.iter().map(|&x| (x - m).exp()).collect();
        let s: f32 = e.iter().sum();
        p.iter_mut().zip(&e).for_each(|(p, &e)| *p = e / s);
    }
    let binary =
        u.iter().enumerate().map(|(i, &x)| if i % 3 == 0 { 0.3 } else { f32::from(x > 0.0) }).collect();
    (probs, binary)
}

/// One problem's host inputs, on values that every element type represents exactly:
/// logits rounded to `dtype`, class indices with every seventh row ignored (-100),
/// probability and binary targets, and per-row and per-element upstream gradients.
pub struct Fixture {
    pub rows: usize,
    pub classes: usize,
    pub dtype: xent::Dtype,
    /// The logits as f32, already rounded to `dtype`.
    pub logits: Vec<f32>,
    /// The logits' 16-bit words for a half `dtype` (empty for f32).
    pub bits: Vec<u16>,
    pub targets: Vec<i64>,
    pub probs: Vec<f32>,
    pub binary: Vec<f32>,
    pub upstream_rows: Vec<f32>,
    pub upstream_elems: Vec<f32>,
}

impl Fixture {
    pub fn new(rows: usize, classes: usize, dtype: xent::Dtype, seed: u64) -> Self {
        let raw = xent::synth::logits(rows, classes, 2.0, seed);
        let (logits, bits) = match dtype.half() {
            None => (raw, Vec::new()),
            Some(f) => {
                let bits: Vec<u16> = raw.iter().map(|&x| f.from_f32(x)).collect();
                (bits.iter().map(|&b| f.to_f32(b)).collect(), bits)
            }
        };
        let mut targets = xent::synth::targets(rows, classes, seed + 1);
        targets.iter_mut().step_by(7).for_each(|t| *t = -100);
        let u = xent::synth::logits(rows, classes, 1.0, seed + 2);
        let (probs, binary) = dense_targets(&u, classes);
        let upstream_rows = (0..rows).map(|r| 0.5 + (r % 5) as f32 * 0.25).collect();
        let upstream_elems = (0..rows * classes).map(|i| 0.25 + (i % 7) as f32 * 0.125).collect();
        Self { rows, classes, dtype, logits, bits, targets, probs, binary, upstream_rows, upstream_elems }
    }

    /// The upstream gradient of a backward of `kind` under `reduction`: per element
    /// (binary) or per row under `none`, else the scalar 0.75.
    pub fn upstream(&self, kind: xent::LabelKind, reduction: xent::Reduction) -> xent::Upstream<'_> {
        use xent::{LabelKind, Reduction, Upstream};
        match (reduction, kind) {
            (Reduction::None, LabelKind::Binary) => Upstream::PerElement(&self.upstream_elems),
            (Reduction::None, _) => Upstream::PerRow(&self.upstream_rows),
            _ => Upstream::Scalar(0.75),
        }
    }
}

/// The options of a committed case folder of tests/data (scripts/make_reference.py):
/// weights.npy, pos_weight.npy and options.txt (`key = value` lines).
pub fn case_options(dir: &std::path::Path) -> xent::LossOptions {
    let f32s = |name: &str| match xent::npy::read(dir.join(name)).unwrap().data {
        xent::npy::NpyData::F32(v) => v,
        other => panic!("{}: {other:?}", dir.join(name).display()),
    };
    let mut opts = xent::LossOptions::new();
    if dir.join("weights.npy").exists() {
        opts = opts.weights(f32s("weights.npy"));
    }
    if dir.join("pos_weight.npy").exists() {
        opts = opts.pos_weight(f32s("pos_weight.npy"));
    }
    for line in std::fs::read_to_string(dir.join("options.txt")).unwrap().lines() {
        let (key, value) = line.split_once(" = ").unwrap();
        let x: f64 = value.parse().unwrap();
        opts = match key {
            "ignore_index" => opts.ignore_index(x as i64),
            "label_smoothing" => opts.label_smoothing(x),
            "z_loss" => opts.z_loss(x),
            "softcap" => opts.softcap(x),
            "logit_scale" => opts.logit_scale(x),
            "n_items" => opts.n_items(x),
            other => panic!("unknown option {other}"),
        };
    }
    opts
}
