//! Timers of the linear head for `xent bench --linear`: the head through the front door,
//! and its floor, the plain product `h Wᵀ` of the same shape by the same GEMM kernel on
//! the same adapter (`÷gemm`).

use std::time::Instant;

use crate::backend::Backend;
use crate::error::Result;
use crate::head::{HeadGradients, LinearHead, Values};
use crate::options::LossOptions;
use crate::problem::{Gradient, Problem};

use super::buffers::{Recorder, bind_ranges};
use super::context::GpuContext;
use super::kernels::{GemmEntry, GemmParams};
use super::linear_plan::{HeadWork, LinearPlan};

/// Deterministic values in [-scale, scale).
fn values(len: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

impl GpuContext {
    /// Milliseconds per product `logits = h Wᵀ` ([rows, dim] × [classes, dim]ᵀ, f32,
    /// `2·rows·classes·dim` flops) by the head's GEMM kernel, in the head's row chunks
    /// (the memory budget) and W pieces, mean over `iters` after one warm-up; each
    /// iteration is one submission, timed on the host from submit to completion.
    #[doc(hidden)]
    pub fn bench_gemm(&self, rows: usize, dim: usize, classes: usize, iters: usize) -> Result<f64> {
        let tile = self.gemm_tile();
        let work = HeadWork::Fused { recompute: false, metrics: false };
        let plan = LinearPlan::new(rows, classes, dim, 4 * tile.x as usize, work, &self.limits, self.budget)?;
        let (n, v, d) = (rows, classes, dim);
        let rc = plan.rows_per_chunk.min(n);
        let h = values(n * d, 1, 1.0);
        let w = values(v * d, 2, 0.1);
        self.scoped(|| {
            use wgpu::BufferUsages as U;
            let make = |label: &str, usage: U, size: u64| {
                self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(label),
                    size: size.max(16).next_multiple_of(16),
                    usage,
                    mapped_at_creation: false,
                })
            };
            let st = U::STORAGE | U::COPY_DST;
            let hb = make("xent bench h", st, (n * d * 4) as u64);
            let wb = make("xent bench w", st, (v * d * 4) as u64);
            // One piece of logits at a time (the whole rows when W is one piece).
            let cb = make("xent bench logits", st, (rc * plan.piece_classes * 4) as u64);
            let bias = make("xent bench bias", st, 16);
            let chunks = n.div_ceil(rc);
            let stride = super::buffers::params_stride(&self.limits);
            let tiles = |m: usize, cols: usize| {
                (m.div_ceil(4 * tile.y as usize) * cols.div_ceil(4 * tile.x as usize)) as u64
            };
            let most = u64::from(self.limits.max_compute_workgroups_per_dimension).pow(2);
            let blocks: u64 =
                (0..plan.pieces).map(|p| tiles(rc, plan.piece(p, v).len()).div_ceil(most)).sum::<u64>()
                    * chunks as u64;
            let params = make("xent bench params", U::UNIFORM | U::COPY_DST, stride * blocks.max(1));
            self.queue.write_buffer(&hb, 0, bytemuck::cast_slice(&h));
            self.queue.write_buffer(&wb, 0, bytemuck::cast_slice(&w));
            let k = &self.kernels;
            let pipe = k.gemm.get(&self.device, d.is_multiple_of(4), false, true, tile, GemmEntry::Store);
            let hb_chunk = |c: usize| {
                let r0 = c * rc;
                let m = rc.min(n - r0);
                (r0, m)
            };
            let align = u64::from(self.limits.min_storage_buffer_offset_alignment).max(4);
            let mut groups = Vec::new();
            for c in 0..chunks {
                let (r0, m) = hb_chunk(c);
                // h of the chunk bound at its rows: offsets aligned, else bound whole.
                let h_at = (r0 * d * 4) as u64;
                let (h_range, a_off) = if h_at.is_multiple_of(align) {
                    ((&hb, h_at, (m * d * 4) as u64), 0)
                } else {
                    ((&hb, 0, hb.size()), (r0 * d) as u32)
                };
                for p in 0..plan.pieces {
                    let piece = plan.piece(p, v);
                    let wr = (&wb, (piece.start * d * 4) as u64, (piece.len() * d * 4) as u64);
                    let g = bind_ranges(
                        &self.device,
                        &k.gemm.kernel,
                        &params,
                        &[h_range, wr, (&cb, 0, cb.size()), (&bias, 0, 16)],
                    );
                    groups.push((g, m, piece, a_off));
                }
            }
            let run = || -> Result<f64> {
                let start = Instant::now();
                let mut rec = Recorder::new(&self.device, &self.limits);
                for (g, m, piece, a_off) in &groups {
                    let p = GemmParams {
                        m: *m as u32,
                        n: piece.len() as u32,
                        k: d as u32,
                        a_off: *a_off,
                        lda: d as u32,
                        ldb: d as u32,
                        ldc: plan.piece_classes as u32,
                        ..bytemuck::Zeroable::zeroed()
                    };
                    self.record_gemm(&mut rec, &pipe, g, p, tile, (false, true));
                }
                let submission = rec.submit(&self.queue, &params);
                self.wait(Some(submission))?;
                Ok(start.elapsed().as_secs_f64() * 1e3)
            };
            run()?;
            let mut total = 0.0;
            for _ in 0..iters.max(1) {
                total += run()?;
            }
            Ok(total / iters.max(1) as f64)
        })
    }

    /// Milliseconds per call of the linear head through the front door ([rows, dim]
    /// hidden states, [classes, dim] weight, a bias, `opts`): the loss alone, or with
    /// `backward` the loss and dh, dW, db; host time of the whole call (uploads and
    /// readbacks included), mean over `iters` after one warm-up.
    #[doc(hidden)]
    pub fn bench_linear(
        &self,
        rows: usize,
        dim: usize,
        classes: usize,
        backward: bool,
        opts: &LossOptions,
        iters: usize,
    ) -> Result<f64> {
        let h = values(rows * dim, 1, 1.0);
        let w = values(classes * dim, 2, 0.1);
        let b = values(classes, 3, 0.1);
        let t: Vec<i64> = (0..rows).map(|r| ((r * 7919) % classes) as i64).collect();
        let run = || -> Result<f64> {
            let head = LinearHead::new(Values::F32(&h), Values::F32(&w), dim).bias(Values::F32(&b));
            let mut problem = Problem::linear(head, &t[..]);
            if backward {
                problem = problem.gradient(Gradient::Linear(HeadGradients::owned()));
            }
            let start = Instant::now();
            self.evaluate(problem, opts)?;
            Ok(start.elapsed().as_secs_f64() * 1e3)
        };
        run()?;
        let mut total = 0.0;
        for _ in 0..iters.max(1) {
            total += run()?;
        }
        Ok(total / iters.max(1) as f64)
    }
}
