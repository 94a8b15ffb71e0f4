//! Tree sums on the device: the levels of `reduce_sum.wgsl` over a buffer, and the sum
//! over a call's per-chunk sums, read back.

use crate::error::Result;

use super::buffers::{Recorder, groups_x};
use super::context::GpuContext;
use super::kernels::{Kernels, NO_INDEX, ReduceParams};

/// The levels of a tree sum of `count` values starting at element `src` of a buffer;
/// each level writes its partial sums right after its input.
pub(crate) struct Levels {
    pub levels: Vec<ReduceParams>,
    /// Index of the final value.
    pub result: u32,
    /// Elements of the buffer the reduction touches.
    pub extent: u64,
}

impl Levels {
    /// Records the levels' dispatches of `reduce_sum.wgsl` over the buffer `bg` binds.
    pub fn record(&self, rec: &mut Recorder<'_>, kernels: &Kernels, bg: &wgpu::BindGroup) {
        let per_group = 2 * u64::from(kernels.workgroup_size);
        for level in &self.levels {
            rec.dispatch(&kernels.reduce, bg, level, u64::from(level.count).div_ceil(per_group));
        }
    }
}

pub(crate) fn reduce_levels(
    count: u64,
    src: u64,
    wg: u32,
    max_dim: u32,
    divisor: f32,
    divisor_index: u32,
) -> Levels {
    let per_group = 2 * u64::from(wg);
    let mut levels = Vec::new();
    let (mut count, mut src) = (count.max(1), src);
    loop {
        let groups = count.div_ceil(per_group);
        let dst = src + count;
        levels.push(ReduceParams {
            count: count as u32,
            src: src as u32,
            dst: dst as u32,
            groups_x: groups_x(groups, max_dim),
            divisor: 1.0,
            last: 0,
            divisor_index: NO_INDEX,
            _pad: 0,
        });
        if groups == 1 {
            let last = levels.last_mut().expect("one level");
            last.last = 1;
            last.divisor = divisor;
            last.divisor_index = divisor_index;
            return Levels { levels, result: dst as u32, extent: dst + 1 };
        }
        (count, src) = (groups, dst);
    }
}

impl GpuContext {
    /// Reduces `count` per-chunk sums in `sums` (bound as `sums_bg`) on the device, the
    /// last level dividing by `divisor`, and reads the total back through `readback`.
    pub(crate) fn reduce_sums(
        &self,
        sums: &wgpu::Buffer,
        sums_bg: &wgpu::BindGroup,
        count: u64,
        divisor: f32,
        params: &wgpu::Buffer,
        readback: &wgpu::Buffer,
    ) -> Result<f32> {
        let wg = self.kernels.workgroup_size;
        let levels =
            reduce_levels(count, 0, wg, self.limits.max_compute_workgroups_per_dimension, divisor, NO_INDEX);
        let mut rec = Recorder::new(&self.device, &self.limits);
        levels.record(&mut rec, &self.kernels, sums_bg);
        rec.copy(sums, u64::from(levels.result) * 4, readback, 0, 4);
        let submission = rec.submit(&self.queue, params);
        let map = self.request_map(readback, 8);
        let mut total = f32::NAN;
        self.finish_map(readback, map, Some(submission), |b| total = bytemuck::cast_slice::<u8, f32>(b)[0])?;
        Ok(total)
    }
}
