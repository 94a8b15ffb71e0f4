//! How the kernels are shaped for an adapter ([`Tuning`]) and how a row of V classes is
//! laid over a workgroup ([`rows_layout`]): pure values, imported by the kernels, the plan
//! and the context alike; this module depends on nothing that owns a device.

/// Columns of one workgroup of the split and grid kernels (`row_partials`,
/// `cross_entropy_backward`).
pub const SPLIT_BLOCK_COLS: usize = 4096;

/// How the kernels are shaped for an adapter: chosen from the adapter type by
/// [`Tuning::for_adapter`] (measured on lavapipe; GPU values follow the usual practice
/// and await measurement on real GPUs), overridable through `XENT_WORKGROUP_SIZE`,
/// `XENT_ELEMS_PER_THREAD`, `XENT_MAX_THREADS_PER_ROW`, `XENT_CACHED`, `XENT_SUBGROUPS`
/// (0: the workgroup-memory merge even where the device has subgroups),
/// `XENT_MAX_WORKGROUPS` and `XENT_FEW_ROWS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// Invocations per workgroup (a power of two; the `WG` override constant).
    pub workgroup_size: u32,
    /// Elements per invocation, at least, on the fused kernel's streaming path: fewer,
    /// longer invocations per row for larger values.
    pub elems_per_thread: u64,
    /// At most this many invocations per row on the streaming path.
    pub max_threads_per_row: u32,
    /// Floats per invocation kept in registers on the fused kernel's one-read path: rows
    /// up to `workgroup_size × cached_per_thread` take it.
    pub cached_per_thread: u32,
    /// Merge a row's states with subgroup operations when the device has `SUBGROUP` (and
    /// one row fills the workgroup); workgroup memory alone otherwise.
    pub subgroups: bool,
    /// At most this many workgroups of the fused kernel per dispatch (0: one per row
    /// group); each then takes row groups in turn. Fewer rows in flight keep a long row
    /// in the cache between its two reads.
    pub max_workgroups: u32,
    /// Batches of fewer rows than this, with rows of at least 8192 classes, are spread
    /// over a (row × 4096-column block) grid of workgroups so that they fill a GPU (0:
    /// never). CPU adapters gain nothing from more workgroups and pay the grid's extra
    /// passes: 2–3× slower than whole rows on lavapipe at 2 × 262144. `u32::MAX`: every
    /// batch of class indices, rows of any length (the metrics on adapters whose fused
    /// kernel has no record binding, `Tuning::grid_for_all`).
    pub few_rows: u32,
    /// Read f16 logits with the portable reader (unpacked from u32 words) even where the
    /// device has `SHADER_F16` (WGSL `f16`); `XENT_PORTABLE_F16=1`.
    pub portable_f16: bool,
}

impl Tuning {
    /// GPUs: wide workgroups, many invocations per row (memory parallelism), rows up to
    /// 8192 classes cached in registers.
    pub const GPU: Tuning = Tuning {
        workgroup_size: 256,
        elems_per_thread: 8,
        max_threads_per_row: 1024,
        cached_per_thread: 32,
        subgroups: true,
        max_workgroups: 0,
        few_rows: 64,
        portable_f16: false,
    };
    /// CPU adapters (lavapipe, llvmpipe) run invocations as SIMD lanes on one thread per
    /// dispatch: few invocations per row and small workgroups measured fastest there, and
    /// large private arrays are slow.
    pub const CPU: Tuning = Tuning {
        workgroup_size: 64,
        elems_per_thread: 1024,
        max_threads_per_row: 4,
        cached_per_thread: 4,
        subgroups: true,
        max_workgroups: 0,
        few_rows: 0,
        portable_f16: false,
    };

    /// The tuning for an adapter, with the `XENT_*` environment overrides applied.
    pub fn for_adapter(info: &wgpu::AdapterInfo) -> Tuning {
        let mut t = match info.device_type {
            wgpu::DeviceType::Cpu => Self::CPU,
            _ => Self::GPU,
        };
        let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
        if let Some(w) = var("XENT_WORKGROUP_SIZE") {
            t.workgroup_size = w as u32;
        }
        if let Some(e) = var("XENT_ELEMS_PER_THREAD") {
            t.elems_per_thread = e;
        }
        if let Some(m) = var("XENT_MAX_THREADS_PER_ROW") {
            t.max_threads_per_row = m as u32;
        }
        if let Some(c) = var("XENT_CACHED") {
            t.cached_per_thread = c as u32;
        }
        if let Some(s) = var("XENT_SUBGROUPS") {
            t.subgroups = s != 0;
        }
        if let Some(m) = var("XENT_MAX_WORKGROUPS") {
            t.max_workgroups = m.min(u64::from(u32::MAX)) as u32;
        }
        if let Some(f) = var("XENT_FEW_ROWS") {
            t.few_rows = f.min(u64::from(u32::MAX)) as u32;
        }
        if let Some(p) = var("XENT_PORTABLE_F16") {
            t.portable_f16 = p != 0;
        }
        t
    }

    /// Clamped to what the device allows: a power-of-two workgroup within its limits.
    pub fn within(self, limits: &wgpu::Limits) -> Tuning {
        let max = limits.max_compute_invocations_per_workgroup.min(limits.max_compute_workgroup_size_x);
        let wg = self.workgroup_size.clamp(1, max.max(1));
        Tuning {
            workgroup_size: 1 << (31 - wg.leading_zeros()),
            elems_per_thread: self.elems_per_thread.max(1),
            max_threads_per_row: self.max_threads_per_row.max(1),
            cached_per_thread: self.cached_per_thread.clamp(4, 1024),
            subgroups: self.subgroups,
            max_workgroups: self.max_workgroups,
            few_rows: self.few_rows,
            portable_f16: self.portable_f16,
        }
    }

    /// Whether `rows` rows of `classes` take the (row × column block) grid.
    pub(crate) fn row_grid(&self, rows: usize, classes: usize) -> bool {
        self.few_rows == u32::MAX || (rows < self.few_rows as usize && classes >= 2 * SPLIT_BLOCK_COLS)
    }

    /// This tuning with every batch of class indices on the row grid.
    pub(crate) fn grid_for_all(self) -> Self {
        Self { few_rows: u32::MAX, ..self }
    }

    /// Workgroups to dispatch for `row_groups` groups of rows of the fused kernel.
    pub(crate) fn rows_workgroups(&self, row_groups: u64) -> u64 {
        match self.max_workgroups {
            0 => row_groups,
            most => row_groups.min(u64::from(most)),
        }
    }
}

impl std::fmt::Display for Tuning {
    /// The `XENT_*` variables that reproduce it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "XENT_WORKGROUP_SIZE={} XENT_ELEMS_PER_THREAD={} XENT_MAX_THREADS_PER_ROW={} XENT_CACHED={} \
             XENT_SUBGROUPS={} XENT_MAX_WORKGROUPS={} XENT_FEW_ROWS={} XENT_PORTABLE_F16={}",
            self.workgroup_size,
            self.elems_per_thread,
            self.max_threads_per_row,
            self.cached_per_thread,
            u8::from(self.subgroups),
            self.max_workgroups,
            self.few_rows,
            u8::from(self.portable_f16)
        )
    }
}

/// Invocations per row of `cross_entropy_rows.wgsl` for `classes` columns, and whether
/// the row fits the one-read (register-cached) path: rows up to `CACHED` elements per
/// invocation of a workgroup are cached; longer rows stream with `elems_per_thread`
/// (tuned per adapter) elements per invocation at least.
///
/// Each invocation takes at most [`MAX_LANE_STEPS`] elements of a row per pass (more
/// invocations per row than the tuning asks where a row is longer than that allows).
pub fn rows_layout(classes: u64, tuning: &Tuning) -> (u32, bool) {
    let wg = u64::from(tuning.workgroup_size);
    let cached = u64::from(tuning.cached_per_thread);
    if classes <= wg * cached {
        (classes.div_ceil(cached).max(1).next_power_of_two() as u32, true)
    } else {
        let most = wg.min(u64::from(tuning.max_threads_per_row.max(1)));
        let t = (classes / tuning.elems_per_thread.max(1)).clamp(1, most);
        let tuned = 1u64 << (63 - t.leading_zeros());
        let needed = classes.div_ceil(MAX_LANE_STEPS).next_power_of_two();
        (tuned.max(needed).min(wg) as u32, false)
    }
}

/// The most elements of a row one invocation of the fused row kernel walks per pass (one
/// loop iteration each in the gradient pass). CPU adapters (llvmpipe) end a loop after
/// 65535 iterations without a word, leaving the rest of the row unwritten; rows longer
/// than the workgroup size times this would need the (row × block) grid there.
pub const MAX_LANE_STEPS: u64 = 60000;

/// The longest K one GEMM dispatch walks. CPU adapters (llvmpipe) stop a loop nest after
/// 65535 iterations, inner loops included, and leave the rest of the sum out without a
/// word: the shared-tile K loop takes about K / BK · (BK + 40) of them, the direct one
/// K / 4 · 4. Longer products are split into dispatches that accumulate; the epilogues
/// (K = D) need D within it (`LinearPlan`).
pub const GEMM_MAX_K: u32 = 16384;

/// The tile of the linear head's matrix product (`gemm.wgsl`): a workgroup of `x` × `y`
/// invocations, each with a 4 × 4 register tile, so a (4y × 4x) tile of the output per
/// workgroup, walking K in steps of `k` through workgroup memory, or (`shared` false)
/// each invocation reading its own blocks of the operands. Pipeline constants, chosen per
/// adapter by [`GemmTuning::for_adapter`], overridable with `XENT_GEMM_TILE=XxYxK`
/// (e.g. `16x16x16`), `XxYxdirect` (no workgroup tiles) or `XxYxbroadcast` (the
/// broadcast tile, on devices whose subgroups are 8 lanes), and its K segment with
/// `XENT_GEMM_K_SEGMENT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmTuning {
    /// Invocations along the output's columns.
    pub x: u32,
    /// Invocations along the output's rows.
    pub y: u32,
    /// K step (a multiple of 4) through workgroup memory.
    pub k: u32,
    /// Operand tiles in workgroup memory (else each invocation loads its own blocks).
    pub shared: bool,
    /// The broadcast tile: 16 rows per invocation, shared by the lanes of a subgroup of 8
    /// (each loads a part of A, subgroup broadcasts hand it to all); no workgroup tiles.
    /// Only where the device has `SUBGROUP` with subgroups of exactly 8 lanes, and in one
    /// row of invocations (`y` = 1: WGSL takes subgroup builtins in one-dimensional
    /// workgroups only).
    pub broadcast: bool,
    /// The longest K one dispatch of a plain product walks (at most [`GEMM_MAX_K`]); longer
    /// products are dispatched in K segments that accumulate into C. On CPU adapters a
    /// workgroup streams its whole slab of B (K × its columns) and the next workgroups
    /// (the same columns, other rows) find it in the cache only while it fits: dh = G·W
    /// over K = V walks megabytes a slab in one dispatch. Not a pipeline constant.
    pub k_segment: u32,
}

impl GemmTuning {
    /// GPUs: 256 invocations, 64 × 64 output tiles, K steps of 16 through workgroup memory.
    pub const GPU: GemmTuning =
        GemmTuning { x: 16, y: 16, k: 16, shared: true, broadcast: false, k_segment: GEMM_MAX_K };
    /// CPU adapters (lavapipe, llvmpipe): a workgroup runs as SIMD lanes of one thread,
    /// workgroup memory is memory like any other and a barrier switches between the
    /// lanes' batches, so each invocation reads its own operand blocks (measured in
    /// docs/benchmarks.md: with workgroup tiles every tile tried ran at the same speed).
    pub const CPU: GemmTuning =
        GemmTuning { x: 16, y: 16, k: 16, shared: false, broadcast: false, k_segment: CPU_K_SEGMENT };
    /// CPU adapters whose subgroups are 8 SIMD lanes (lavapipe at 256 bits): a load is a
    /// loop over the lanes there and a broadcast from a constant lane a register shuffle,
    /// so 32 invocations share 16 rows, 2 loads of A and 4 of B a lane per K step of 4
    /// for 256 multiply-adds (4 × 4 direct: 8 loads for 64). Measured in
    /// docs/benchmarks.md: the head 3–4× faster than with the direct tile.
    pub const CPU_BROADCAST: GemmTuning =
        GemmTuning { x: 32, y: 1, k: 16, shared: false, broadcast: true, k_segment: CPU_K_SEGMENT };

    /// Rows of the output per invocation (16 for the broadcast tile, 4 otherwise).
    pub fn rows_per_invocation(self) -> u32 {
        if self.broadcast { 16 } else { 4 }
    }

    /// The tile for an adapter, with `XENT_GEMM_TILE` applied. The broadcast tile also
    /// needs the device's `SUBGROUP` feature (see [`GemmTuning::for_device`]).
    pub fn for_adapter(info: &wgpu::AdapterInfo) -> GemmTuning {
        let t = match info.device_type {
            wgpu::DeviceType::Cpu if eight_lane_subgroups(info) => Self::CPU_BROADCAST,
            wgpu::DeviceType::Cpu => Self::CPU,
            _ => Self::GPU,
        };
        let parsed = std::env::var("XENT_GEMM_TILE").ok().and_then(|v| {
            let p: Vec<&str> = v.split('x').collect();
            let num = |s: &str| s.parse::<u32>().ok();
            match p[..] {
                [x, y, "direct"] => {
                    Some(GemmTuning { x: num(x)?, y: num(y)?, shared: false, broadcast: false, ..t })
                }
                [x, y, "broadcast"] => {
                    Some(GemmTuning { x: num(x)?, y: num(y)?, shared: false, broadcast: true, ..t })
                }
                [x, y, k] => Some(GemmTuning {
                    x: num(x)?,
                    y: num(y)?,
                    k: num(k)?,
                    shared: true,
                    broadcast: false,
                    ..t
                }),
                _ => None,
            }
        });
        let mut t = parsed.unwrap_or(t);
        if let Some(seg) = std::env::var("XENT_GEMM_K_SEGMENT").ok().and_then(|v| v.parse::<u32>().ok()) {
            t.k_segment = seg;
        }
        t
    }

    /// [`GemmTuning::for_adapter`] on a device with `features` and `limits`, clamped
    /// ([`GemmTuning::within`]): without `SUBGROUP`, or subgroups other than 8 lanes, the
    /// broadcast tile becomes the direct one of the same shape.
    pub fn for_device(
        info: &wgpu::AdapterInfo,
        features: wgpu::Features,
        limits: &wgpu::Limits,
        tile_floats: u32,
    ) -> GemmTuning {
        let mut t = Self::for_adapter(info);
        // `XENT_GEMM_TILE` may ask for the broadcast tile on any adapter.
        if t.broadcast && !(eight_lane_subgroups(info) && features.contains(wgpu::Features::SUBGROUP)) {
            t.broadcast = false;
        }
        t.within(limits, tile_floats)
    }

    /// Clamped to the device and to the shader's workgroup memory (`TILE_FLOATS` floats
    /// per operand, which the partials epilogue reuses for four floats per invocation):
    /// powers of two, `x·y` invocations within the limits, K a multiple of 4.
    pub fn within(self, limits: &wgpu::Limits, tile_floats: u32) -> GemmTuning {
        let pow2 = |v: u32| 1u32 << (31 - v.max(1).leading_zeros());
        let mut x = pow2(self.x.min(limits.max_compute_workgroup_size_x));
        let mut y = if self.broadcast { 1 } else { pow2(self.y.min(limits.max_compute_workgroup_size_y)) };
        while x * y > limits.max_compute_invocations_per_workgroup.max(1) {
            if x >= y { x /= 2 } else { y /= 2 }
        }
        let mut k = pow2(self.k.max(4)).max(4);
        while k > 4 && k * 4 * x.max(y) > tile_floats {
            k /= 2;
        }
        // The operand tiles, and the partials epilogue's four floats per invocation.
        while k * 4 * x.max(y) > tile_floats || 4 * x * y > tile_floats {
            if x >= y { x /= 2 } else { y /= 2 }
        }
        // The broadcast tile's subgroups of 8 lie along a workgroup row.
        if self.broadcast && x < 8 {
            return GemmTuning { broadcast: false, ..self }.within(limits, tile_floats);
        }
        // Whole K steps of 4, within what one dispatch may walk.
        let k_segment = (self.k_segment.clamp(4, GEMM_MAX_K) / 4) * 4;
        GemmTuning { x, y, k, k_segment, ..self }
    }
}

/// [`GemmTuning::k_segment`] on CPU adapters: a slab of B of 1024 × 128 f32 is 512 KiB,
/// within a core's L2 (measured in docs/benchmarks.md).
const CPU_K_SEGMENT: u32 = 1024;

/// Subgroups of exactly 8 lanes, what the broadcast tile's `lanes8` assumes.
fn eight_lane_subgroups(info: &wgpu::AdapterInfo) -> bool {
    info.subgroup_min_size == 8 && info.subgroup_max_size == 8
}

#[cfg(test)]
mod tests {
    use super::GemmTuning;

    #[test]
    fn the_broadcast_tile_stays_one_row_of_at_least_eight() {
        let limits = wgpu::Limits::default();
        let t = GemmTuning { y: 4, ..GemmTuning::CPU_BROADCAST }.within(&limits, 1024);
        assert!(t.broadcast && t.y == 1 && t.x == 32 && t.rows_per_invocation() == 16, "{t:?}");
        let narrow = wgpu::Limits { max_compute_workgroup_size_x: 4, ..limits.clone() };
        let t = GemmTuning::CPU_BROADCAST.within(&narrow, 1024);
        assert!(!t.broadcast && t.x == 4 && t.rows_per_invocation() == 4, "{t:?}");
        assert_eq!(GemmTuning::CPU.within(&limits, 1024).rows_per_invocation(), 4);
    }

    #[test]
    fn k_segments_are_whole_steps_within_one_dispatch() {
        let limits = wgpu::Limits::default();
        let seg = |k_segment| GemmTuning { k_segment, ..GemmTuning::CPU }.within(&limits, 1024).k_segment;
        assert_eq!(seg(1024), 1024);
        assert_eq!(seg(1030), 1028);
        assert_eq!(seg(0), 4);
        assert_eq!(seg(u32::MAX), super::GEMM_MAX_K);
        assert_eq!(GemmTuning::GPU.within(&limits, 1024).k_segment, super::GEMM_MAX_K);
    }
}
