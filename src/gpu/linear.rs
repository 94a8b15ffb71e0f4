//! The fused linear + cross-entropy head on the device (`x = h Wᵀ + b`, never stored
//! whole): rows in chunks of `Rc` within the memory budget, W bound in pieces of whole
//! classes when `V·D` is beyond one storage binding, each chunk down one of three paths
//! ([`HeadPath`], chosen by [`LinearPlan`]):
//!
//! - **Partials** (the loss alone): `gemm.wgsl`'s tile product with the `partials`
//!   epilogue (`gemm_epilogue.wgsl`) reduces each tile of logits to per-row online-softmax
//!   parts in registers and workgroup memory; `merge_partials.wgsl` combines a row's
//!   parts into its loss, LSE and (max, sum). No logits buffer: O(Rc · V / 32) parts.
//! - **Whole rows** (loss and gradients, rows within a binding): `logits_c = h_c Wᵀ + b`
//!   into a chunk buffer, the fused row kernel (`cross_entropy_rows.wgsl`, every option,
//!   the whole batch's denominators) writing G over it, then `dh_c = G W`,
//!   `dW += Gᵀ h_c`, `db += Σ_rows G` (`linear_colsum.wgsl`): the logits product once.
//! - **Recompute** (gradients from row statistics: a saved LSE as (lse, 1), or the
//!   partials forward first): per piece of W, the `grad` epilogue forms G from the
//!   recomputed tile of logits in registers (`class_grad.wgsl`) into a buffer of that
//!   piece's columns, then the piece's products. Rows of any length.
//!
//! No float atomics: every output element is summed by one invocation in a fixed order,
//! so results are bit-identical run to run. The device holds W, dW and db (O(VD)), one
//! chunk's h, dh and logits, G or parts, and O(Rc) row state; the row losses and LSE come
//! back per chunk (O(N)) and the loss is their f64 sum in row order. Half-precision `h`,
//! `W` and `b` are widened to f32 on the host once (O(ND + VD)); the products accumulate
//! in f32.

use std::ops::Range;

use crate::error::{Error, Result};
use crate::head::LinearTask;
use crate::metrics::{MetricSums, MetricsSpec, RowMetrics};
use crate::options::{Batch, LossOptions, LossOutput, Reduction, Upstream};
use crate::problem::Mode;

use super::buffers::{Recorder, Slot, bind, bind_ranges, groups_x};
use super::context::GpuContext;
use super::kernels::{
    ColsumParams, F_METRICS, GEMM_ACCUMULATE, GEMM_BIAS, GEMM_TILE_FLOATS, GemmEntry, GemmParams, GradMode,
    HeadTargetParams, KernelOpts, LOSS_METRICS, LOSS_PER_ROW, MergeParams, RowParams, RowsPipeline,
};
pub use super::linear_plan::{HeadPath, HeadWork, LinearPlan};
use super::linear_plan::{PART_BYTES, SLOTS};
use super::metrics::{RECORD_BYTES, entries_needed, entry_words, metric_levels};
use super::ring::{MAX_PARAM_BLOCKS, Ring};
use super::tuning::{GemmTuning, MAX_LANE_STEPS, rows_layout};
use super::workspace::Workspace;

/// The call's device buffers.
struct Buffers {
    w: wgpu::Buffer,
    bias: wgpu::Buffer,
    weights: wgpu::Buffer,
    h: wgpu::Buffer,
    /// Whole rows: the chunk's logits (then G). Recompute: G of one piece.
    logits: wgpu::Buffer,
    /// The partials' entries (three vec4 per row and tile).
    partials: wgpu::Buffer,
    /// Each chunk row's target logit, for the partials' metrics (`head_target.wgsl`).
    target_logit: wgpu::Buffer,
    dh: wgpu::Buffer,
    dw: wgpu::Buffer,
    db: wgpu::Buffer,
    targets: wgpu::Buffer,
    row_loss: wgpu::Buffer,
    row_lse: wgpu::Buffer,
    row_stats: wgpu::Buffer,
    /// merge_partials' mean weights (unread: the head's denominators come from the host).
    row_weight: wgpu::Buffer,
    dummy: wgpu::Buffer,
    norm: wgpu::Buffer,
    upstream: wgpu::Buffer,
    /// The fused row kernel's metric records (whole rows, with the metrics).
    row_metrics: wgpu::Buffer,
    /// Their sums: an entry per chunk, then the reduction's scratch.
    metric_entries: wgpu::Buffer,
    params: wgpu::Buffer,
    /// Parameter blocks `params` holds: a submission's worth (at least one product's
    /// dispatches, which K segments multiply).
    param_blocks: u64,
    readback: Vec<Slot>,
    /// dW and db come back through it in pieces (bounded, reused: no per-call buffer).
    staging: wgpu::Buffer,
}

/// Where a chunk's readback goes: its rows, and whether dh is in it.
struct Back {
    rows: Range<usize>,
    dh: bool,
}

impl GpuContext {
    /// The linear head (see the module's documentation).
    pub(crate) fn linear_head(&self, task: LinearTask<'_>, opts: &LossOptions) -> Result<LossOutput> {
        let LinearTask {
            head, rows: n, classes: v, batch, mode, grad_hidden, grad_weight, grad_bias, ..
        } = task;
        let (want_rows, want_lse) = (task.row_losses, task.lse);
        let d = head.dim;
        let backward = matches!(mode, Mode::Backward { .. });
        let (saved_lse, upstream) = match mode {
            Mode::Fused => (None, Upstream::Scalar(1.0)),
            Mode::Backward { lse, upstream } => {
                let lse = lse.ok_or_else(|| Error::InvalidOption("a backward needs the saved LSE".into()))?;
                crate::cpu::reference::check_lse(lse, n)?;
                upstream.check(n)?;
                if matches!(upstream, Upstream::PerElement(_)) {
                    return Err(Error::InvalidOption(
                        "the linear head takes a scalar or per-row upstream gradient".into(),
                    ));
                }
                (Some(lse), upstream)
            }
        };
        let want = (grad_hidden.is_some(), grad_weight.is_some(), grad_bias.is_some() && head.bias.is_some());
        let grads = want.0 || want.1 || want.2;
        // The metrics: from the partials' tiles (the loss alone, or the recompute path's
        // forward), or the fused row kernel's over whole rows.
        let metrics = opts.get_metrics().filter(|_| !backward);
        if let Some(spec) = metrics {
            super::metrics::check_spec(spec, self.path_name())?;
        }
        let m = metrics.is_some();
        let work = match (backward, grads) {
            (true, _) => HeadWork::Backward,
            (false, false) => HeadWork::Loss { metrics: m },
            // Without the fused kernel's metrics binding (8 storage buffers a stage), the
            // metrics come from the recompute path's partials.
            (false, true) => HeadWork::Fused {
                recompute: recompute_preferred() || (m && self.kernels.rows_metrics.is_none()),
                metrics: m,
            },
        };
        let tile = self.gemm_tile();
        let plan = LinearPlan::new(n, v, d, 4 * tile.x as usize, work, &self.limits, self.budget)?;
        let binding = self.limits.max_storage_buffer_binding_size.min(self.limits.max_buffer_size);
        if opts.get_weights().is_some() && v as u64 * 4 > binding {
            return Err(Error::Unsupported {
                path: "gpu".into(),
                cell: "linear head with class weights for more classes than one storage binding holds".into(),
                why: format!("{v} class weights do not fit a binding of {binding} bytes"),
            });
        }
        let h = head.hidden.to_f32();
        let w = head.weight.to_f32();
        let bias: Option<Vec<f32>> = head.bias.map(|b| b.to_f32().into_owned());
        let dh_out = grad_hidden;
        let mut row_loss = vec![0.0f32; if backward { 0 } else { n }];
        let mut row_lse = vec![0.0f32; if backward { 0 } else { n }];
        let mut records = metrics.filter(|s| s.get_per_row()).map(|_| vec![crate::RowMetrics::UNSET; n]);
        let mut sums = None;
        // Calls on one context are serialised on its workspace, whose slots the head's
        // buffers live in: repeated calls of one shape create none.
        let mut ws = self.workspace.lock().unwrap_or_else(|p| p.into_inner());
        self.scoped(|| {
            let bufs = self.linear_buffers(
                &mut ws,
                &plan,
                v,
                d,
                opts,
                &w,
                bias.as_deref(),
                want.1 || want.2,
                metrics.map(|spec| (spec, n.div_ceil(plan.rows_per_chunk))),
            )?;
            let run = LinearRun {
                ctx: self,
                plan: &plan,
                bufs: &bufs,
                batch: &batch,
                opts,
                h: &h,
                dim: d,
                has_bias: bias.is_some(),
                want,
                saved_lse,
                upstream,
                grads,
                metrics,
            };
            sums = run.chunks(&mut row_loss, &mut row_lse, records.as_deref_mut(), dh_out)?;
            run.finish(grad_weight, grad_bias)
        })
        // Buffers may still be in flight or mapped after an error.
        .inspect_err(|_| ws.release())?;
        drop(ws);
        if backward {
            return Ok(LossOutput::default());
        }
        let reduction = opts.get_reduction();
        let s = opts.get_z_loss();
        let counted = |i: &usize| batch.targets[*i] != Batch::IGNORED;
        let sum: f64 = row_loss.iter().map(|&l| f64::from(l)).sum();
        let z_sum: f64 = (0..n).filter(counted).map(|i| s * f64::from(row_lse[i]).powi(2)).sum();
        let (loss, z_loss) = batch.reduce_with_z(sum, z_sum, reduction);
        Ok(LossOutput {
            loss,
            row_losses: (want_rows || reduction == Reduction::None).then_some(row_loss),
            lse: want_lse.then_some(row_lse),
            z_loss: if s > 0.0 { z_loss } else { None },
            metrics: sums.map(|sums| crate::Metrics::from_sums(&sums, records.as_deref())),
            ..Default::default()
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn linear_buffers(
        &self,
        ws: &mut Workspace,
        plan: &LinearPlan,
        v: usize,
        d: usize,
        opts: &LossOptions,
        w: &[f32],
        bias: Option<&[f32]>,
        weight_grads: bool,
        metrics: Option<(&MetricsSpec, usize)>,
    ) -> Result<Buffers> {
        use wgpu::BufferUsages as U;
        let dev = &self.device;
        let st = U::STORAGE | U::COPY_SRC | U::COPY_DST;
        let rc = plan.rows_per_chunk as u64;
        let (v, d) = (v as u64, d as u64);
        let logits_bytes = match plan.path {
            HeadPath::Partials => 16,
            HeadPath::WholeRows => rc * v * 4,
            HeadPath::Recompute => rc * plan.piece_classes as u64 * 4,
        };
        let partials_bytes =
            if plan.path == HeadPath::WholeRows { PART_BYTES } else { rc * plan.blocks as u64 * PART_BYTES };
        let mut created = 0u64;
        let mut next = 0usize;
        let slots = &mut ws.linear.slots;
        let mut make = |label: &str, usage: U, size: u64| {
            // Exactly the size asked (no power-of-two growth: W may be near max_buffer_size).
            let size = size.max(16).next_multiple_of(16);
            let slot = &mut slots[next];
            next += 1;
            created += u64::from(slot.ensure(dev, label, usage, size, size));
            slot.get().clone()
        };
        let stride = super::buffers::params_stride(&self.limits);
        let param_blocks = self.head_param_blocks(plan, v as usize, d as usize);
        let bufs = Buffers {
            w: make("xent linear w", st, v * d * 4),
            bias: make("xent linear bias", st, if bias.is_some() { v * 4 } else { 16 }),
            weights: make("xent linear weights", st, opts.get_weights().map_or(16, |w| w.len() as u64 * 4)),
            h: make("xent linear h", st, rc * d * 4),
            logits: make("xent linear logits", st, logits_bytes),
            partials: make("xent linear partials", st, partials_bytes),
            target_logit: make("xent linear target logit", st, if metrics.is_some() { rc * 4 } else { 16 }),
            dh: make("xent linear dh", st, rc * d * 4),
            dw: make("xent linear dw", st, v * d * 4),
            db: make("xent linear db", st, v * 4),
            targets: make("xent linear targets", st, rc * 4),
            row_loss: make("xent linear row_loss", st, rc * 4),
            row_lse: make("xent linear row_lse", st, rc * 4),
            row_stats: make("xent linear row_stats", st, rc * 8),
            row_weight: make("xent linear row_weight", st, rc * 4),
            dummy: make("xent linear dummy", st, 16),
            norm: make("xent linear norm", st, 16),
            upstream: make("xent linear upstream", st, rc * 4),
            row_metrics: make(
                "xent linear row_metrics",
                st,
                if metrics.is_some() { rc * RECORD_BYTES } else { 32 },
            ),
            metric_entries: make(
                "xent linear metric sums",
                st,
                match metrics {
                    Some((spec, chunks)) => {
                        let (wg, max_dim) =
                            (self.kernels.workgroup_size, self.limits.max_compute_workgroups_per_dimension);
                        let count = entries_needed(spec, plan.rows_per_chunk, chunks, wg, max_dim);
                        count * entry_words(spec) as u64 * 4
                    }
                    None => 16,
                },
            ),
            params: make("xent linear params", U::UNIFORM | U::COPY_DST, stride * param_blocks),
            param_blocks,
            readback: Vec::new(),
            staging: make(
                "xent linear staging",
                U::MAP_READ | U::COPY_DST,
                if weight_grads { staging_bytes(v, d, self.budget) } else { 16 },
            ),
        };
        let per_row = metrics.is_some_and(|(s, _)| s.get_per_row());
        let entry = metrics.map_or(0, |(s, _)| entry_words(s) as u64 * 4);
        let bytes = readback_bytes(plan.rows_per_chunk, d as usize, per_row).max(entry);
        ws.linear.readback.resize_with(SLOTS, Slot::default);
        for s in &mut ws.linear.readback {
            created +=
                u64::from(s.ensure(dev, "xent linear readback", U::MAP_READ | U::COPY_DST, bytes, bytes));
        }
        let mut bufs = bufs;
        bufs.readback = ws.linear.readback.clone();
        ws.allocations += created;
        self.queue.write_buffer(&bufs.w, 0, bytemuck::cast_slice(w));
        if let Some(b) = bias {
            self.queue.write_buffer(&bufs.bias, 0, bytemuck::cast_slice(b));
        }
        if let Some(wt) = opts.get_weights() {
            self.queue.write_buffer(&bufs.weights, 0, bytemuck::cast_slice(wt));
        }
        self.queue.write_buffer(&bufs.norm, 0, bytemuck::cast_slice(&[1.0f32, 1.0, 0.0, 0.0]));
        Ok(bufs)
    }

    /// Records `C (+)= op(A)·op(B)` over `m × n` (the params' `m`, `n`, `k`, offsets and
    /// strides set; `a_t`, `b_t` the operands' layouts as the pipeline's), its tiles in as
    /// many dispatches as the dispatch limits need, K in segments of at most the tile's
    /// [`GemmTuning::k_segment`] accumulating into C (the bias added once).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn record_gemm(
        &self,
        rec: &mut Recorder<'_>,
        pipeline: &RowsPipeline,
        group: &wgpu::BindGroup,
        params: GemmParams,
        tile: GemmTuning,
        (a_t, b_t): (bool, bool),
    ) {
        let (bm, bn) = (tile.rows_per_invocation() * tile.y, 4 * tile.x);
        let tiles_n = params.n.div_ceil(bn);
        let total = u64::from(params.m.div_ceil(bm)) * u64::from(tiles_n);
        let max_dim = self.limits.max_compute_workgroups_per_dimension;
        let most = u64::from(max_dim).pow(2);
        let mut k0 = 0;
        while k0 < params.k.max(1) {
            let len = tile.k_segment.min(params.k - k0);
            // Segment k0.. of K: A's and B's offsets move along K in their layouts.
            let seg = GemmParams {
                k: len,
                a_off: params.a_off + if a_t { k0 * params.lda } else { k0 },
                b_off: params.b_off + if b_t { k0 } else { k0 * params.ldb },
                flags: if k0 == 0 { params.flags } else { (params.flags | GEMM_ACCUMULATE) & !GEMM_BIAS },
                ..params
            };
            let mut base = 0;
            while base < total {
                let groups = most.min(total - base);
                let p = GemmParams {
                    tiles_n,
                    tile_base: base as u32,
                    groups_x: groups_x(groups, max_dim),
                    ..seg
                };
                rec.dispatch_pipeline(pipeline, group, &p, groups);
                base += groups;
            }
            k0 += tile.k_segment;
        }
    }

    /// Dispatches of one [`GpuContext::record_gemm`] of `m × n` over `k`.
    pub(crate) fn gemm_dispatches(&self, tile: GemmTuning, m: usize, n: usize, k: usize) -> u64 {
        let bm = (tile.rows_per_invocation() * tile.y) as usize;
        let tiles = (m.div_ceil(bm) * n.div_ceil(4 * tile.x as usize)) as u64;
        let most = u64::from(self.limits.max_compute_workgroups_per_dimension).pow(2);
        tiles.div_ceil(most) * (k as u64).div_ceil(u64::from(tile.k_segment)).max(1)
    }

    /// Parameter blocks one submission of the head may need: [`MAX_PARAM_BLOCKS`], or the
    /// dispatches of its largest product (its K segments, [`GemmTuning::k_segment`]).
    fn head_param_blocks(&self, plan: &LinearPlan, v: usize, d: usize) -> u64 {
        let tile = self.gemm_tile();
        let rc = plan.rows_per_chunk;
        let cols = plan.piece_classes.min(v);
        let products = [
            self.gemm_dispatches(tile, rc, cols, d),
            self.gemm_dispatches(tile, rc, d, cols),
            self.gemm_dispatches(tile, cols, d, rc),
        ];
        products.into_iter().fold(MAX_PARAM_BLOCKS, u64::max)
    }

    /// The GEMM tile of this device.
    pub(crate) fn gemm_tile(&self) -> GemmTuning {
        GemmTuning::for_device(self.adapter_info(), self.device().features(), &self.limits, GEMM_TILE_FLOATS)
    }
}

/// Rows of G one `linear_colsum` dispatch sums: two a loop iteration, within CPU
/// adapters' 65535 (see [`MAX_LANE_STEPS`]).
const COLSUM_ROWS: usize = 2 * MAX_LANE_STEPS as usize;

/// `XENT_LINEAR_RECOMPUTE=1`: loss and gradients in one call take the recompute path
/// even where whole rows fit (to measure one path against the other).
fn recompute_preferred() -> bool {
    std::env::var("XENT_LINEAR_RECOMPUTE").is_ok_and(|v| v == "1")
}

/// Bytes of the staging buffer dW and db come back through: all of dW, or a 64th of the
/// memory budget (at least 4 MiB: 16 MiB of the default 1 GiB) when that is less. Each
/// piece costs one map and wait, far less than a copy of dW held beside the device's.
fn staging_bytes(v: u64, d: u64, budget: u64) -> u64 {
    (v * d * 4).min((budget / 64).max(4 << 20))
}

/// Bytes of a chunk's readback: dh, then the row losses and LSE, then (with `metrics`)
/// the metric records.
fn readback_bytes(rows: usize, d: usize, metrics: bool) -> u64 {
    ((rows * d + 2 * rows) * 4) as u64 + if metrics { rows as u64 * RECORD_BYTES } else { 0 }
}

/// One call's state while its chunks run.
struct LinearRun<'a> {
    ctx: &'a GpuContext,
    plan: &'a LinearPlan,
    bufs: &'a Buffers,
    batch: &'a Batch,
    opts: &'a LossOptions,
    h: &'a [f32],
    dim: usize,
    has_bias: bool,
    /// dh, dW, db.
    want: (bool, bool, bool),
    saved_lse: Option<&'a [f32]>,
    upstream: Upstream<'a>,
    grads: bool,
    /// The metrics asked for (their sums reduced on the device).
    metrics: Option<&'a MetricsSpec>,
}

impl LinearRun<'_> {
    fn chunks(
        &self,
        row_loss: &mut [f32],
        row_lse: &mut [f32],
        mut records: Option<&mut [RowMetrics]>,
        mut dh_out: Option<&mut [f32]>,
    ) -> Result<Option<MetricSums>> {
        let ctx = self.ctx;
        let b = self.bufs;
        let dev = &ctx.device;
        let k = &ctx.kernels;
        let plan = self.plan;
        let path = plan.path;
        let (n, v, d) = (self.batch.rows, self.batch.classes, self.dim);
        let rc = plan.rows_per_chunk;
        let tile = ctx.gemm_tile();
        let bn = 4 * tile.x as usize;
        let max_dim = ctx.limits.max_compute_workgroups_per_dimension;
        let vec4_d = d.is_multiple_of(4);
        // G's rows (V or a piece's columns) and dW's pieces in vec4 steps.
        let vec4_v = vec4_d && v.is_multiple_of(4) && plan.piece_classes.is_multiple_of(4);
        let gemm =
            |vec4: bool, a_t: bool, b_t: bool, entry: GemmEntry| k.gemm.get(dev, vec4, a_t, b_t, tile, entry);
        let nt = gemm(vec4_d, false, true, GemmEntry::Store);
        let nn = gemm(vec4_v, false, false, GemmEntry::Store);
        let tn = gemm(vec4_v, true, false, GemmEntry::Store);
        let parts_pipe = gemm(vec4_d, false, true, GemmEntry::Partials);
        let grad_pipe = gemm(vec4_d, false, true, GemmEntry::Grad);
        fn whole(buf: &wgpu::Buffer) -> (&wgpu::Buffer, u64, u64) {
            (buf, 0, buf.size())
        }
        // Piece p of an array of `per` floats a class (offsets aligned by the plan).
        let piece_of = |buf, p: usize, per: usize| {
            let r = plan.piece(p, v);
            (buf, (r.start * per * 4) as u64, (r.len() * per * 4) as u64)
        };
        let bias_of = |p: usize| if self.has_bias { piece_of(&b.bias, p, 1) } else { whole(&b.dummy) };
        let db_of = |p: usize| if self.want.2 { piece_of(&b.db, p, 1) } else { whole(&b.dummy) };
        let (store, epilogue) = (&k.gemm.kernel, &k.gemm.epilogue);
        // The epilogues' bindings over piece p, their output in `c`, their per-row values
        // in `per_row`.
        let epilogue_group = |p: usize, c: &wgpu::Buffer, per_row: &wgpu::Buffer| {
            let ranges = [
                whole(&b.h),
                piece_of(&b.w, p, d),
                whole(c),
                bias_of(p),
                whole(&b.targets),
                whole(&b.weights),
                whole(&b.row_stats),
                whole(per_row),
            ];
            bind_ranges(dev, epilogue, &b.params, &ranges)
        };
        let pieces = 0..plan.pieces;
        let forward = self.saved_lse.is_none();
        let want_metrics = self.metrics.is_some();
        let (mut logits_groups, mut part_groups, mut g_groups) = (Vec::new(), Vec::new(), Vec::new());
        let mut target_groups = Vec::new();
        match path {
            HeadPath::WholeRows => {
                logits_groups = pieces
                    .clone()
                    .map(|p| {
                        let ranges = [whole(&b.h), piece_of(&b.w, p, d), whole(&b.logits), bias_of(p)];
                        bind_ranges(dev, store, &b.params, &ranges)
                    })
                    .collect();
            }
            HeadPath::Partials | HeadPath::Recompute => {
                if forward {
                    part_groups =
                        pieces.clone().map(|p| epilogue_group(p, &b.partials, &b.target_logit)).collect();
                }
                if forward && want_metrics {
                    target_groups = pieces
                        .clone()
                        .map(|p| {
                            let ranges = [
                                whole(&b.h),
                                piece_of(&b.w, p, d),
                                bias_of(p),
                                whole(&b.targets),
                                whole(&b.target_logit),
                            ];
                            bind_ranges(dev, &k.head_target, &b.params, &ranges)
                        })
                        .collect();
                }
                if self.grads {
                    g_groups = pieces.clone().map(|p| epilogue_group(p, &b.logits, &b.upstream)).collect();
                }
            }
        }
        // The products from G (over the whole rows, or one piece's columns), when asked.
        let grad_pieces = || pieces.clone().filter(|_| self.grads);
        let dh_groups: Vec<_> = grad_pieces()
            .map(|p| {
                let ranges = [whole(&b.logits), piece_of(&b.w, p, d), whole(&b.dh), whole(&b.dummy)];
                bind_ranges(dev, store, &b.params, &ranges)
            })
            .collect();
        let dw_groups: Vec<_> = grad_pieces()
            .map(|p| {
                let ranges = [whole(&b.logits), whole(&b.h), piece_of(&b.dw, p, d), whole(&b.dummy)];
                bind_ranges(dev, store, &b.params, &ranges)
            })
            .collect();
        let db_groups: Vec<_> = grad_pieces()
            .map(|p| bind_ranges(dev, &k.colsum, &b.params, &[whole(&b.logits), db_of(p)]))
            .collect();
        let rows_buffers =
            [&b.logits, &b.targets, &b.row_loss, &b.row_lse, &b.dummy, &b.row_stats, &b.norm, &b.weights];
        let want_records = records.is_some();
        let metrics_group = bind(dev, &k.reduce_metrics, &b.params, &[&b.row_metrics, &b.metric_entries]);
        let chunks = n.div_ceil(rc);
        let (rows_group, metrics_bit) = match &k.rows_metrics {
            Some(kernel) if want_metrics => {
                let mut buffers = rows_buffers.to_vec();
                buffers.push(&b.row_metrics);
                (bind(dev, kernel, &b.params, &buffers), F_METRICS)
            }
            _ => (bind(dev, &k.rows, &b.params, &rows_buffers), 0),
        };
        let merge_group = bind(
            dev,
            &k.merge,
            &b.params,
            &[
                &b.partials,
                &b.targets,
                &b.row_loss,
                &b.row_lse,
                &b.row_weight,
                &b.row_stats,
                &b.weights,
                &b.row_metrics,
            ],
        );

        let reduction = self.opts.get_reduction();
        let kopts = KernelOpts::new(self.opts, v).for_batch(self.batch, self.opts);
        let grad_scale = self.batch.gradient_scale(reduction);
        let (threads_per_row, cached) = rows_layout(v as u64, &ctx.tuning);
        let wg = k.workgroup_size;
        let rows_per_group = (wg / threads_per_row) as usize;
        let rows_pipeline =
            k.rows_variants.get(dev, super::kernels::ElemFormat::f32_for(v), kopts.features() | metrics_bit);
        let (rows_at, lse_at) = (rc * d * 4, rc * d * 4 + rc * 4);
        let metrics_at = lse_at + rc * 4;
        let mut ring = Ring::new(ctx, &b.readback, &b.params, SLOTS);
        let mut out = |back: Back, bytes: &[u8]| {
            let floats: &[f32] = bytemuck::cast_slice(bytes);
            let r = back.rows.clone();
            if let (true, Some(dh)) = (back.dh, dh_out.as_deref_mut()) {
                dh[r.start * d..r.end * d].copy_from_slice(&floats[..r.len() * d]);
            }
            if !row_loss.is_empty() {
                row_loss[r.clone()].copy_from_slice(&floats[rows_at / 4..rows_at / 4 + r.len()]);
                row_lse[r.clone()].copy_from_slice(&floats[lse_at / 4..lse_at / 4 + r.len()]);
            }
            if let Some(m) = records.as_deref_mut() {
                let n = r.len();
                super::metrics::decode(&bytemuck::cast_slice(bytes)[metrics_at / 4..][..n * 8], &mut m[r]);
            }
        };
        // The upstream gradient: a scalar in the parameters, or one per row.
        let (g_scale, per_row) = match self.upstream {
            Upstream::Scalar(g) => (g * grad_scale, false),
            Upstream::PerRow(_) => (grad_scale, true),
            Upstream::PerElement(_) => unreachable!("rejected by linear_head"),
        };
        // What every logits product shares: the loss's fields for the epilogues.
        let head = GemmParams {
            k: d as u32,
            lda: d as u32,
            ldb: d as u32,
            flags: if self.has_bias { GEMM_BIAS } else { 0 },
            classes: v as u32,
            ignore_index: Batch::IGNORED,
            grad_scale: g_scale,
            loss_flags: if per_row { LOSS_PER_ROW } else { 0 },
            out_stride: plan.blocks as u32,
            ..bytemuck::Zeroable::zeroed()
        }
        .with_opts(&kopts);
        // G's row stride: whole rows, or one piece's columns.
        let g_cols = if path == HeadPath::WholeRows { v } else { plan.piece_classes };
        let mut stats: Vec<[f32; 2]> = Vec::new();
        for (ci, r0) in (0..n).step_by(rc).enumerate() {
            let rows = r0..(r0 + rc).min(n);
            let m = rows.len();
            let slot = ring.next_slot(&mut out)?;
            ctx.queue.write_buffer(&b.h, 0, bytemuck::cast_slice(&self.h[rows.start * d..rows.end * d]));
            ctx.queue.write_buffer(&b.targets, 0, bytemuck::cast_slice(&self.batch.targets[rows.clone()]));
            if let Upstream::PerRow(g) = self.upstream {
                ctx.queue.write_buffer(&b.upstream, 0, bytemuck::cast_slice(&g[rows.clone()]));
            }
            if let Some(lse) = self.saved_lse {
                stats.clear();
                stats.extend(lse[rows.clone()].iter().map(|&l| [l, 1.0]));
                ctx.queue.write_buffer(&b.row_stats, 0, bytemuck::cast_slice(&stats));
            }
            let mut rec = Recorder::new(dev, &ctx.limits);
            // Submits what is recorded when the parameter blocks would outgrow the buffer.
            let flush = |rec: &mut Recorder<'_>, need: u64| {
                if rec.blocks() + need > b.param_blocks {
                    let full = std::mem::replace(rec, Recorder::new(dev, &ctx.limits));
                    full.submit(&ctx.queue, &b.params);
                }
            };
            let gemm_dispatches = |m: usize, n: usize, k: usize| ctx.gemm_dispatches(tile, m, n, k);
            // h_c Wₚᵀ (+ bₚ) over piece p into `pipeline`'s epilogue (C from column c_off).
            let logits_product = |rec: &mut Recorder<'_>,
                                  p: usize,
                                  pipeline: &RowsPipeline,
                                  group: &wgpu::BindGroup,
                                  c_off: usize,
                                  loss_flags: u32| {
                let piece = plan.piece(p, v);
                flush(rec, gemm_dispatches(m, piece.len(), d));
                let params = GemmParams {
                    m: m as u32,
                    n: piece.len() as u32,
                    c_off: c_off as u32,
                    ldc: g_cols as u32,
                    col_base: piece.start as u32,
                    out_base: plan.first_block(p, bn) as u32,
                    loss_flags: head.loss_flags | loss_flags,
                    ..head
                };
                ctx.record_gemm(rec, pipeline, group, params, tile, (false, true));
            };
            // 1. The loss (and, on whole rows, G): the fused row kernel over the chunk's
            // logits, or the tiles' parts merged per row.
            if path == HeadPath::WholeRows {
                for (p, group) in logits_groups.iter().enumerate() {
                    logits_product(&mut rec, p, &nt, group, plan.piece(p, v).start, 0);
                }
                flush(&mut rec, 1);
                let wgs = ctx.tuning.rows_workgroups(m.div_ceil(rows_per_group) as u64);
                let params = RowParams {
                    rows: m as u32,
                    classes: v as u32,
                    row_base: 0,
                    groups_x: groups_x(wgs, max_dim),
                    grad_scale,
                    grad_mode: if self.grads { GradMode::InPlace } else { GradMode::None } as u32,
                    ignore_index: Batch::IGNORED,
                    threads_per_row,
                    cached: u32::from(cached),
                    ..bytemuck::Zeroable::zeroed()
                }
                .with_opts(&kopts);
                rec.dispatch_pipeline(&rows_pipeline, &rows_group, &params, wgs);
                // The chunk's metric sums into its entry.
                if let Some(spec) = self.metrics {
                    let levels =
                        metric_levels(spec, m, true, 0, chunks as u32, Some(ci as u32), (wg, max_dim));
                    flush(&mut rec, levels.levels.len() as u64);
                    levels.record(&mut rec, k, &metrics_group);
                }
            } else if forward {
                // With the metrics, each row's target logit first: the tiles count the
                // logits above it.
                for (p, group) in target_groups.iter().enumerate() {
                    flush(&mut rec, 1);
                    let piece = plan.piece(p, v);
                    let groups = (m as u64).div_ceil(u64::from(wg));
                    let params = HeadTargetParams {
                        rows: m as u32,
                        dim: d as u32,
                        col_base: piece.start as u32,
                        count: piece.len() as u32,
                        classes: v as u32,
                        ignore_index: Batch::IGNORED,
                        has_bias: u32::from(self.has_bias),
                        groups_x: groups_x(groups, max_dim),
                        logit_scale: kopts.logit_scale,
                        softcap: kopts.softcap,
                        first_piece: u32::from(p == 0),
                        _pad0: 0,
                    };
                    rec.dispatch(&k.head_target, group, &params, groups);
                }
                let flags = if want_metrics { LOSS_METRICS } else { 0 };
                for (p, group) in part_groups.iter().enumerate() {
                    logits_product(&mut rec, p, &parts_pipe, group, 0, flags);
                }
                flush(&mut rec, 1);
                let groups = (m as u64).div_ceil(u64::from(wg));
                let params = MergeParams {
                    rows: m as u32,
                    blocks: plan.blocks as u32,
                    row_base: 0,
                    groups_x: groups_x(groups, max_dim),
                    classes: v as u32,
                    ignore_index: Batch::IGNORED,
                    metrics: u32::from(want_metrics),
                    ..bytemuck::Zeroable::zeroed()
                }
                .with_opts(&kopts);
                rec.dispatch(&k.merge, &merge_group, &params, groups);
                // The chunk's metric sums into its entry.
                if let Some(spec) = self.metrics {
                    let levels =
                        metric_levels(spec, m, true, 0, chunks as u32, Some(ci as u32), (wg, max_dim));
                    flush(&mut rec, levels.levels.len() as u64);
                    levels.record(&mut rec, k, &metrics_group);
                }
            }
            // 2. Per piece: G (recomputed from the rows' statistics, unless whole rows
            // hold it), dh_c += Gₚ Wₚ, dWₚ += Gₚᵀ h_c, dbₚ += Σ_rows Gₚ.
            for p in pieces.clone().filter(|_| self.grads) {
                let piece = plan.piece(p, v);
                // Column of piece p in the G buffer.
                let g0 = if path == HeadPath::WholeRows { piece.start } else { 0 };
                if path != HeadPath::WholeRows {
                    logits_product(&mut rec, p, &grad_pipe, &g_groups[p], 0, 0);
                }
                if self.want.0 {
                    flush(&mut rec, gemm_dispatches(m, d, piece.len()));
                    let params = GemmParams {
                        m: m as u32,
                        n: d as u32,
                        k: piece.len() as u32,
                        a_off: g0 as u32,
                        lda: g_cols as u32,
                        ldb: d as u32,
                        ldc: d as u32,
                        flags: if p > 0 { GEMM_ACCUMULATE } else { 0 },
                        ..bytemuck::Zeroable::zeroed()
                    };
                    ctx.record_gemm(&mut rec, &nn, &dh_groups[p], params, tile, (false, false));
                }
                if self.want.1 {
                    flush(&mut rec, gemm_dispatches(piece.len(), d, m));
                    let params = GemmParams {
                        m: piece.len() as u32,
                        n: d as u32,
                        k: m as u32,
                        a_off: g0 as u32,
                        lda: g_cols as u32,
                        ldb: d as u32,
                        ldc: d as u32,
                        flags: if ci > 0 { GEMM_ACCUMULATE } else { 0 },
                        ..bytemuck::Zeroable::zeroed()
                    };
                    ctx.record_gemm(&mut rec, &tn, &dw_groups[p], params, tile, (true, false));
                }
                if self.want.2 {
                    let per = u64::from(wg) * u64::from(max_dim).pow(2);
                    let mut c0 = 0u64;
                    while c0 < piece.len() as u64 {
                        let count = per.min(piece.len() as u64 - c0);
                        let wgs = count.div_ceil(u64::from(wg));
                        for (s, r0) in (0..m).step_by(COLSUM_ROWS).enumerate() {
                            flush(&mut rec, 1);
                            let params = ColsumParams {
                                rows: COLSUM_ROWS.min(m - r0) as u32,
                                cols: g_cols as u32,
                                groups_x: groups_x(wgs, max_dim),
                                accumulate: u32::from(ci > 0 || s > 0),
                                col_base: (g0 as u64 + c0) as u32,
                                count: count as u32,
                                db_base: c0 as u32,
                                row_base: r0 as u32,
                            };
                            rec.dispatch(&k.colsum, &db_groups[p], &params, wgs);
                        }
                        c0 += count;
                    }
                }
            }
            let rb = ring.readback(slot);
            let dh = self.want.0;
            if dh {
                rec.copy(&b.dh, 0, rb, 0, (m * d * 4) as u64);
            }
            if forward {
                rec.copy(&b.row_loss, 0, rb, rows_at as u64, (m * 4) as u64);
                rec.copy(&b.row_lse, 0, rb, lse_at as u64, (m * 4) as u64);
            }
            if want_records {
                rec.copy(&b.row_metrics, 0, rb, metrics_at as u64, m as u64 * RECORD_BYTES);
            }
            let map = if want_records {
                metrics_at + m * RECORD_BYTES as usize
            } else if forward {
                lse_at + m * 4
            } else if dh {
                m * d * 4
            } else {
                0
            };
            ring.submit(rec, slot, map as u64, Back { rows, dh });
        }
        ring.drain(&mut out)?;
        match self.metrics {
            Some(spec) => {
                let entries = (&b.metric_entries, &metrics_group);
                let readback = ring.readback(0);
                ctx.read_metric_sums(spec, entries, chunks, &b.params, readback).map(Some)
            }
            None => Ok(None),
        }
    }

    /// Reads dW and db back into the caller's slices (through the bounded staging
    /// buffer: no copy of dW on the host). With no rows, both are zero.
    fn finish(&self, dw: Option<&mut [f32]>, db: Option<&mut [f32]>) -> Result<()> {
        let (_, want_dw, want_db) = self.want;
        let outs = [(&self.bufs.dw, dw.filter(|_| want_dw)), (&self.bufs.db, db.filter(|_| want_db))];
        for (src, out) in outs {
            match out {
                Some(out) if self.batch.rows == 0 => out.fill(0.0),
                Some(out) => self.read_back(src, out)?,
                None => {}
            }
        }
        Ok(())
    }

    /// `out.len()` floats of `src` from its start, through the staging buffer in pieces.
    fn read_back(&self, src: &wgpu::Buffer, out: &mut [f32]) -> Result<()> {
        let ctx = self.ctx;
        let staging = &self.bufs.staging;
        let step = (staging.size() / 4) as usize;
        for (i, part) in out.chunks_mut(step).enumerate() {
            let bytes = (part.len() * 4) as u64;
            let mut rec = Recorder::new(&ctx.device, &ctx.limits);
            rec.copy(src, (i * step * 4) as u64, staging, 0, bytes);
            let submission = rec.submit(&ctx.queue, &self.bufs.params);
            let map = ctx.request_map(staging, bytes);
            ctx.finish_map(staging, map, Some(submission), |b| {
                part.copy_from_slice(bytemuck::cast_slice(b))
            })?;
        }
        Ok(())
    }
}
