//! GPU timing for `xent bench`: the loss kernels on data already on the device, and the
//! in-run rooflines on the same adapter — a copy kernel moving the bytes of a fused
//! loss + gradient pass (1 read + 1 write of N×V f32), and a read-only reduction moving
//! the bytes of a loss-only pass. GPU time comes from timestamp queries around the
//! recorded passes when the adapter has `TIMESTAMP_QUERY`, else from the wall time
//! around submit + wait.

use std::time::Instant;

use crate::error::{Error, Result};

use super::buffers::{Recorder, bind_ranges, groups_x};
use super::context::GpuContext;
use super::kernels::{BENCH_COPY_WGSL, BENCH_READ_WGSL, BenchParams, Kernel, RO, RW};
use super::resident::{DeviceGradient, DeviceLabels, DeviceLogits, DeviceProblem, DeviceWorkspace};

/// Which passes a loss measurement runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// Loss only (1 read of the logits).
    Forward,
    /// Loss and gradient (2 reads + 1 write).
    ForwardBackward,
}

impl Pass {
    /// `forward` or `forward-backward`.
    pub fn name(self) -> &'static str {
        match self {
            Pass::Forward => "forward",
            Pass::ForwardBackward => "forward-backward",
        }
    }
}

/// How a time was measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timing {
    /// GPU timestamp queries around the passes.
    Timestamp,
    /// Host wall time around submit + wait.
    Wall,
}

impl Timing {
    /// `timestamp` or `wall`.
    pub fn name(self) -> &'static str {
        match self {
            Timing::Timestamp => "timestamp",
            Timing::Wall => "wall",
        }
    }
}

/// How often to run a measurement: untimed warm-up runs, then timed ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Repeats {
    /// Untimed runs first.
    pub warmup: usize,
    /// Timed runs.
    pub iters: usize,
}

impl Repeats {
    /// Runs in all.
    pub fn total(self) -> usize {
        self.warmup + self.iters
    }
}

/// Timed repetitions, in milliseconds.
#[derive(Clone, Debug)]
pub struct Samples {
    /// One time per measured iteration (after warm-up).
    pub ms: Vec<f64>,
    /// How they were taken.
    pub timing: Timing,
}

impl Samples {
    /// The median.
    pub fn median(&self) -> f64 {
        let mut v = self.ms.clone();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
        }
    }
    /// The minimum.
    pub fn min(&self) -> f64 {
        self.ms.iter().copied().fold(f64::INFINITY, f64::min)
    }
}

/// Workgroup size of the roofline kernels.
const ROOFLINE_WG: u32 = 256;

struct Timestamps {
    set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    readback: wgpu::Buffer,
    period_ns: f64,
}

/// vec4s each invocation of `bench_read.wgsl` sums (`READS` there).
const READ_VEC4S_PER_INVOCATION: u64 = 16;

/// The GPU side of the benchmark, on one context.
pub struct GpuBench<'a> {
    ctx: &'a GpuContext,
    roofline_wg: u32,
    copy: Kernel,
    read: Kernel,
    timestamps: Option<Timestamps>,
}

impl<'a> GpuBench<'a> {
    /// Builds the roofline kernels and, when the device has them, timestamp queries.
    pub fn new(ctx: &'a GpuContext) -> Result<Self> {
        ctx.scoped(|| {
            let d = &ctx.device;
            // The rooflines keep one shape whatever the loss kernels' tuning: 256
            // invocations (or the device's maximum), each moving 4 vec4s.
            let wg = ROOFLINE_WG.min(ctx.limits.max_compute_invocations_per_workgroup);
            let copy =
                Kernel::new::<BenchParams>(d, "bench_copy", BENCH_COPY_WGSL, &[(RO, 16), (RW, 16)], wg);
            let read = Kernel::new::<BenchParams>(d, "bench_read", BENCH_READ_WGSL, &[(RO, 16), (RW, 4)], wg);
            let timestamps = d.features().contains(wgpu::Features::TIMESTAMP_QUERY).then(|| Timestamps {
                set: d.create_query_set(&wgpu::QuerySetDescriptor {
                    label: Some("xent bench"),
                    ty: wgpu::QueryType::Timestamp,
                    count: 2,
                }),
                resolve: d.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("xent timestamps"),
                    size: 16,
                    usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: false,
                }),
                readback: d.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("xent timestamps readback"),
                    size: 16,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                }),
                period_ns: f64::from(ctx.queue.get_timestamp_period()),
            });
            Ok(Self { ctx, roofline_wg: wg, copy, read, timestamps })
        })
    }

    /// Whether [N, V] f32 fits in one device buffer (the device-resident measurement).
    pub fn fits(&self, rows: usize, classes: usize) -> bool {
        (rows as u64) * (classes as u64) * 4 <= self.ctx.limits.max_buffer_size
    }

    /// Times `record` over `warmup + iters` submissions.
    fn time(
        &self,
        repeats: Repeats,
        mut record: impl FnMut(&mut wgpu::CommandEncoder) -> Result<()>,
        on_iter: &mut dyn FnMut(),
    ) -> Result<Samples> {
        let ctx = self.ctx;
        let mut ms = Vec::with_capacity(repeats.iters);
        for i in 0..repeats.total() {
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            let mark = |enc: &mut wgpu::CommandEncoder, t: &Timestamps, begin: bool| {
                enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("xent bench mark"),
                    timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                        query_set: &t.set,
                        beginning_of_pass_write_index: begin.then_some(0),
                        end_of_pass_write_index: (!begin).then_some(1),
                    }),
                });
            };
            if let Some(t) = &self.timestamps {
                mark(&mut enc, t, true);
            }
            record(&mut enc)?;
            if let Some(t) = &self.timestamps {
                mark(&mut enc, t, false);
                enc.resolve_query_set(&t.set, 0..2, &t.resolve, 0);
                enc.copy_buffer_to_buffer(&t.resolve, 0, &t.readback, 0, 16);
            }
            let start = Instant::now();
            let submission = ctx.queue.submit([enc.finish()]);
            let sample = match &self.timestamps {
                Some(t) => {
                    let map = ctx.request_map(&t.readback, 16);
                    let mut ticks = [0u64; 2];
                    ctx.finish_map(&t.readback, map, Some(submission), |b| {
                        ticks.copy_from_slice(bytemuck::cast_slice(b));
                    })?;
                    ticks[1].saturating_sub(ticks[0]) as f64 * t.period_ns / 1e6
                }
                None => {
                    ctx.wait(Some(submission))?;
                    start.elapsed().as_secs_f64() * 1e3
                }
            };
            if i >= repeats.warmup {
                ms.push(sample);
            }
            on_iter();
        }
        Ok(Samples { ms, timing: if self.timestamps.is_some() { Timing::Timestamp } else { Timing::Wall } })
    }

    fn storage(&self, bytes: u64, label: &str) -> wgpu::Buffer {
        self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes.max(16).next_multiple_of(16),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        })
    }

    /// The loss kernels on `logits` [rows, classes] already uploaded to the device, under
    /// `opts` (the gradient to a separate buffer).
    #[allow(clippy::too_many_arguments)]
    pub fn loss(
        &self,
        logits: &[f32],
        targets: &[i32],
        classes: usize,
        pass: Pass,
        opts: &crate::LossOptions,
        repeats: Repeats,
        on_iter: &mut dyn FnMut(),
    ) -> Result<Samples> {
        let ctx = self.ctx;
        let rows = targets.len();
        if logits.len() != rows * classes {
            return Err(Error::Shape {
                what: "bench logits".into(),
                got: logits.len(),
                expected: rows * classes,
            });
        }
        ctx.scoped(|| {
            let bytes = (logits.len() * 4) as u64;
            let logits_buf = self.storage(bytes, "xent bench logits");
            let targets_buf = self.storage(rows as u64 * 4, "xent bench targets");
            let grad_buf = (pass == Pass::ForwardBackward).then(|| self.storage(bytes, "xent bench grad"));
            ctx.queue.write_buffer(&logits_buf, 0, bytemuck::cast_slice(logits));
            ctx.queue.write_buffer(&targets_buf, 0, bytemuck::cast_slice(targets));
            let gradient = match &grad_buf {
                Some(b) => DeviceGradient::Into(b.into()),
                None => DeviceGradient::None,
            };
            let problem = DeviceProblem {
                logits: DeviceLogits { buffer: &logits_buf, offset: 0, dtype: crate::Dtype::F32 },
                rows,
                classes,
                labels: DeviceLabels::ClassesI32((&targets_buf).into()),
                gradient,
                mode: Default::default(),
            };
            let mut workspace = DeviceWorkspace::new();
            self.time(repeats, |enc| ctx.record(enc, &problem, opts, &mut workspace).map(drop), on_iter)
        })
    }

    /// The copy roofline: 1 read + 1 write of `elems` f32.
    pub fn copy(&self, elems: usize, repeats: Repeats, on_iter: &mut dyn FnMut()) -> Result<Samples> {
        self.roofline(elems, true, repeats, on_iter)
    }

    /// The read roofline: 1 read of `elems` f32.
    pub fn read(&self, elems: usize, repeats: Repeats, on_iter: &mut dyn FnMut()) -> Result<Samples> {
        self.roofline(elems, false, repeats, on_iter)
    }

    fn roofline(
        &self,
        elems: usize,
        copy: bool,
        repeats: Repeats,
        on_iter: &mut dyn FnMut(),
    ) -> Result<Samples> {
        let ctx = self.ctx;
        ctx.scoped(|| {
            let wg = u64::from(self.roofline_wg);
            let max_dim = ctx.limits.max_compute_workgroups_per_dimension;
            let vec4s = (elems as u64).div_ceil(4);
            let bytes = vec4s * 16;
            let src = self.storage(bytes, "xent bench src");
            // Bind in chunks within the binding limit, at aligned offsets.
            let align = u64::from(ctx.limits.min_storage_buffer_offset_alignment).max(16);
            let bind_cap = ctx.limits.max_storage_buffer_binding_size.min(ctx.limits.max_buffer_size);
            let chunk_bytes = (bind_cap / align * align).min(bytes).max(16);
            let chunks = bytes.div_ceil(chunk_bytes);
            // vec4s per workgroup: 4 per invocation for the copy, 16 for the read (which
            // writes one partial sum per invocation).
            let per_group = wg * if copy { 4 } else { READ_VEC4S_PER_INVOCATION };
            let dst_bytes =
                if copy { bytes } else { chunks * ((chunk_bytes / 16).div_ceil(per_group) * wg * 4 + align) };
            let dst = self.storage(dst_bytes, "xent bench dst");
            let kernel = if copy { &self.copy } else { &self.read };
            let params = ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("xent bench params"),
                size: chunks * super::buffers::params_stride(&ctx.limits),
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let mut groups = Vec::new();
            let mut dst_at = 0;
            for c in 0..chunks {
                let at = c * chunk_bytes;
                let len = chunk_bytes.min(bytes - at);
                let count = len / 16;
                let wgs = count.div_ceil(per_group);
                let out_len = if copy { len } else { (wgs * wg * 4).max(16) };
                let bg = bind_ranges(
                    &ctx.device,
                    kernel,
                    &params,
                    &[(&src, at, len), (&dst, if copy { at } else { dst_at }, out_len)],
                );
                if !copy {
                    dst_at += out_len.next_multiple_of(align);
                }
                groups.push((bg, count, wgs));
            }
            self.time(
                repeats,
                |enc| {
                    let mut rec = Recorder::into_encoder(enc, &ctx.limits);
                    for (bg, count, wgs) in &groups {
                        let p = BenchParams {
                            count: *count as u32,
                            groups_x: groups_x(*wgs, max_dim),
                            _pad0: 0,
                            _pad1: 0,
                        };
                        rec.dispatch(kernel, bg, &p, *wgs);
                    }
                    rec.write_params(&ctx.queue, &params);
                    Ok(())
                },
                on_iter,
            )
        })
    }
}
