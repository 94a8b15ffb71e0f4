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
use super::kernels::{GEMM_ACCUMULATE, GemmEntry, GemmParams};
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

/// One of the head's matrix products, as `GpuContext::bench_gemm` times it.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadProduct {
    /// `logits = h Wᵀ`: [rows, dim] × [classes, dim]ᵀ.
    Logits,
    /// `dh = G W`: [rows, classes] × [classes, dim].
    GradHidden,
    /// `dW = Gᵀ h`: [rows, classes]ᵀ × [rows, dim], accumulated over the row chunks.
    GradWeight,
}

impl GpuContext {
    /// Milliseconds per product `which` of a head of [rows, dim] hidden states and
    /// [classes, dim] weights (f32, `2·rows·classes·dim` flops) by the head's GEMM kernel,
    /// in the head's row chunks (the memory budget) and W pieces, with the operand layouts
    /// the head uses; mean over `iters` after one warm-up. Each iteration is one
    /// submission, timed on the host from submit to completion.
    #[doc(hidden)]
    pub fn bench_gemm(
        &self,
        which: HeadProduct,
        rows: usize,
        dim: usize,
        classes: usize,
        iters: usize,
    ) -> Result<f64> {
        let tile = self.gemm_tile();
        let work = HeadWork::Fused { recompute: false, metrics: false };
        let plan = LinearPlan::new(rows, classes, dim, 4 * tile.x as usize, work, &self.limits, self.budget)?;
        let (n, v, d) = (rows, classes, dim);
        let rc = plan.rows_per_chunk.min(n);
        let h = values(n * d, 1, 1.0);
        let w = values(v * d, 2, 0.1);
        let g = values(rc * plan.piece_classes, 3, 0.01);
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
            // One piece of logits (or G) at a time: the whole rows when W is one piece.
            let cb = make("xent bench logits", st, (rc * plan.piece_classes * 4) as u64);
            let dhb = make("xent bench dh", st, (rc * d * 4) as u64);
            let dwb = make("xent bench dw", st, (v * d * 4) as u64);
            let bias = make("xent bench bias", st, 16);
            let chunks = n.div_ceil(rc);
            let stride = super::buffers::params_stride(&self.limits);
            let dispatches: u64 = (0..plan.pieces)
                .map(|p| {
                    let cols = plan.piece(p, v).len();
                    match which {
                        HeadProduct::Logits => self.gemm_dispatches(tile, rc, cols, d),
                        HeadProduct::GradHidden => self.gemm_dispatches(tile, rc, d, cols),
                        HeadProduct::GradWeight => self.gemm_dispatches(tile, cols, d, rc),
                    }
                })
                .sum::<u64>()
                * chunks as u64;
            let param_buf = make("xent bench params", U::UNIFORM | U::COPY_DST, stride * dispatches.max(1));
            self.queue.write_buffer(&hb, 0, bytemuck::cast_slice(&h));
            self.queue.write_buffer(&wb, 0, bytemuck::cast_slice(&w));
            self.queue.write_buffer(&cb, 0, bytemuck::cast_slice(&g));
            let k = &self.kernels;
            let vec4_d = d.is_multiple_of(4);
            let vec4_v = vec4_d && v.is_multiple_of(4) && plan.piece_classes.is_multiple_of(4);
            let (vec4, layout) = match which {
                HeadProduct::Logits => (vec4_d, (false, true)),
                HeadProduct::GradHidden => (vec4_v, (false, false)),
                HeadProduct::GradWeight => (vec4_v, (true, false)),
            };
            let pipe = k.gemm.get(&self.device, vec4, layout.0, layout.1, tile, GemmEntry::Store);
            let align = u64::from(self.limits.min_storage_buffer_offset_alignment).max(4);
            let ldg = plan.piece_classes as u32;
            fn whole(b: &wgpu::Buffer) -> (&wgpu::Buffer, u64, u64) {
                (b, 0, b.size())
            }
            let mut products = Vec::new();
            for c in 0..chunks {
                let r0 = c * rc;
                let m = rc.min(n - r0);
                // h of the chunk bound at its rows: offsets aligned, else bound whole.
                let h_at = (r0 * d * 4) as u64;
                let (h_range, h_off) = if h_at.is_multiple_of(align) {
                    ((&hb, h_at, (m * d * 4) as u64), 0)
                } else {
                    ((&hb, 0, hb.size()), (r0 * d) as u32)
                };
                for p in 0..plan.pieces {
                    let piece = plan.piece(p, v);
                    let wr = (&wb, (piece.start * d * 4) as u64, (piece.len() * d * 4) as u64);
                    let dwr = (&dwb, (piece.start * d * 4) as u64, (piece.len() * d * 4) as u64);
                    let (ranges, params) = match which {
                        HeadProduct::Logits => (
                            [h_range, wr, whole(&cb), whole(&bias)],
                            GemmParams {
                                m: m as u32,
                                n: piece.len() as u32,
                                k: d as u32,
                                a_off: h_off,
                                lda: d as u32,
                                ldb: d as u32,
                                ldc: ldg,
                                ..bytemuck::Zeroable::zeroed()
                            },
                        ),
                        HeadProduct::GradHidden => (
                            [whole(&cb), wr, whole(&dhb), whole(&bias)],
                            GemmParams {
                                m: m as u32,
                                n: d as u32,
                                k: piece.len() as u32,
                                lda: ldg,
                                ldb: d as u32,
                                ldc: d as u32,
                                flags: if p > 0 { GEMM_ACCUMULATE } else { 0 },
                                ..bytemuck::Zeroable::zeroed()
                            },
                        ),
                        HeadProduct::GradWeight => (
                            [whole(&cb), h_range, dwr, whole(&bias)],
                            GemmParams {
                                m: piece.len() as u32,
                                n: d as u32,
                                k: m as u32,
                                b_off: h_off,
                                lda: ldg,
                                ldb: d as u32,
                                ldc: d as u32,
                                flags: if c > 0 { GEMM_ACCUMULATE } else { 0 },
                                ..bytemuck::Zeroable::zeroed()
                            },
                        ),
                    };
                    products.push((bind_ranges(&self.device, &k.gemm.kernel, &param_buf, &ranges), params));
                }
            }
            let run = || -> Result<f64> {
                let start = Instant::now();
                let mut rec = Recorder::new(&self.device, &self.limits);
                for (group, p) in &products {
                    self.record_gemm(&mut rec, &pipe, group, *p, tile, layout);
                }
                let submission = rec.submit(&self.queue, &param_buf);
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
