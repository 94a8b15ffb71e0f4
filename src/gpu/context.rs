//! [`GpuContext`]: a device, its cached pipelines and a reusable workspace of buffers,
//! and the host-side driver of the kernels for problems that live in host memory.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::options::{Batch, LossOptions, LossOutput, Reduction, Targets};

use super::kernels::{GradMode, Kernels, ReduceParams, RowParams};

/// Default workgroup size of the kernels.
const WORKGROUP_SIZE: u32 = 256;
/// Uniform slots per submission: one for the row kernel, the rest for reduction levels
/// (6 levels of 512 cover 2^54 rows).
const PARAM_SLOTS: u64 = 8;

/// What went wrong outside an error scope: set by the device-lost callback and the
/// uncaptured-error handler, read before and after every call.
#[derive(Default)]
struct Faults {
    lost: Mutex<Option<String>>,
    uncaptured: Mutex<Vec<String>>,
}

/// A GPU buffer that is reallocated only when a call needs more than it holds.
#[derive(Default)]
struct Slot {
    buffer: Option<wgpu::Buffer>,
}

impl Slot {
    /// Makes the buffer hold at least `size` bytes; returns true when it was (re)allocated.
    /// Capacity grows to the next power of two (up to `cap`) so that calls of a similar
    /// size reuse it.
    fn ensure(
        &mut self,
        device: &wgpu::Device,
        label: &str,
        usage: wgpu::BufferUsages,
        size: u64,
        cap: u64,
    ) -> bool {
        let size = size.max(8).next_multiple_of(8);
        if self.buffer.as_ref().is_some_and(|b| b.size() >= size) {
            return false;
        }
        let capacity = size.next_power_of_two().min(cap).max(size);
        self.buffer = Some(device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: capacity,
            usage,
            mapped_at_creation: false,
        }));
        true
    }

    fn get(&self) -> &wgpu::Buffer {
        self.buffer.as_ref().expect("slot ensured before use")
    }
}

/// Buffers and bind groups reused across calls.
#[derive(Default)]
struct Workspace {
    logits: Slot,
    targets: Slot,
    row_loss: Slot,
    row_lse: Slot,
    grad: Slot,
    partials: Slot,
    params: Slot,
    readback: Slot,
    rows_bind_group: Option<wgpu::BindGroup>,
    reduce_bind_group: Option<wgpu::BindGroup>,
    /// Buffers created so far (a steady state of same-shape calls creates none).
    allocations: u64,
}

/// Where the logits come from and where the gradient goes.
enum Io<'a> {
    Loss(&'a [f32]),
    Separate(&'a [f32], &'a mut [f32]),
    InPlace(&'a mut [f32]),
}

impl Io<'_> {
    fn logits(&self) -> &[f32] {
        match self {
            Io::Loss(l) | Io::Separate(l, _) => l,
            Io::InPlace(l) => l,
        }
    }
    fn grad_mode(&self) -> GradMode {
        match self {
            Io::Loss(_) => GradMode::None,
            Io::Separate(..) => GradMode::Separate,
            Io::InPlace(_) => GradMode::InPlace,
        }
    }
    fn grad_out(&mut self) -> Option<&mut [f32]> {
        match self {
            Io::Loss(_) => None,
            Io::Separate(_, g) => Some(g),
            Io::InPlace(l) => Some(l),
        }
    }
}

/// A GPU device with the xent kernels built for it.
///
/// Create one per device and keep it: pipelines are built once, and buffers are reused
/// across calls of the same size class. It is `Send + Sync`; calls from several threads
/// are serialised on its workspace.
///
/// ```no_run
/// use xent::{GpuContext, LossOptions};
/// let gpu = GpuContext::new_blocking()?;
/// let logits = vec![0.5f32, 1.5, -1.0, 2.0, 0.0, 0.0];
/// let out = gpu.cross_entropy(&logits, 3, &[1i64, 0], &LossOptions::new().gradient(true))?;
/// println!("loss {:?} on {}", out.loss, gpu.adapter_info().name);
/// # Ok::<(), xent::Error>(())
/// ```
pub struct GpuContext {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    kernels: Kernels,
    workspace: Mutex<Workspace>,
    faults: Arc<Faults>,
    timeout: Duration,
}

/// A fresh wgpu instance over every backend (honouring `WGPU_BACKEND` and friends).
pub fn instance() -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env())
}

/// Every adapter wgpu finds on this machine, over all backends.
pub async fn adapters() -> Vec<wgpu::Adapter> {
    instance().enumerate_adapters(wgpu::Backends::all()).await
}

/// The adapters whose name contains `name` (case-insensitive); all of them for `None`.
/// Fails with [`Error::NoAdapter`] when none matches.
pub fn select_adapters(name: Option<&str>) -> Result<Vec<wgpu::Adapter>> {
    let all = pollster::block_on(adapters());
    if all.is_empty() {
        return Err(Error::NoAdapter {
            detail: String::new(),
        });
    }
    let Some(name) = name else { return Ok(all) };
    let needle = name.to_lowercase();
    let names: Vec<String> = all.iter().map(|a| a.get_info().name).collect();
    let chosen: Vec<_> = all
        .into_iter()
        .filter(|a| a.get_info().name.to_lowercase().contains(&needle))
        .collect();
    if chosen.is_empty() {
        return Err(Error::NoAdapter {
            detail: format!(" matching '{name}' (found: {})", names.join(", ")),
        });
    }
    Ok(chosen)
}

impl GpuContext {
    /// Opens the default (high-performance) adapter.
    pub async fn new() -> Result<Self> {
        let adapter = instance()
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::NoAdapter {
                detail: format!(" ({e})"),
            })?;
        Self::from_adapter(&adapter).await
    }

    /// Blocking form of [`GpuContext::new`].
    pub fn new_blocking() -> Result<Self> {
        pollster::block_on(Self::new())
    }

    /// Opens a device on `adapter` with the adapter's own limits (the defaults are much
    /// smaller than what large batches need).
    pub async fn from_adapter(adapter: &wgpu::Adapter) -> Result<Self> {
        let wanted = wgpu::Features::SUBGROUP | wgpu::Features::TIMESTAMP_QUERY;
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("xent"),
                required_features: adapter.features() & wanted,
                required_limits: adapter.limits(),
                experimental_features: wgpu::ExperimentalFeatures::default(),
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| {
                Error::Gpu(format!(
                    "could not open a device on {}: {e}",
                    adapter.get_info().name
                ))
            })?;
        let faults = Arc::new(Faults::default());
        let f = faults.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            f.uncaptured
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(e.to_string());
        }));
        let f = faults.clone();
        device.set_device_lost_callback(move |reason, message| {
            *f.lost.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(format!("{reason:?}: {message}"));
        });
        Self::build(device, queue, adapter.get_info(), faults)
    }

    /// Blocking form of [`GpuContext::from_adapter`].
    pub fn from_adapter_blocking(adapter: &wgpu::Adapter) -> Result<Self> {
        pollster::block_on(Self::from_adapter(adapter))
    }

    /// Uses a device the caller already has. The device's limits bound the chunk sizes;
    /// its uncaptured-error handler and device-lost callback stay the caller's (xent's own
    /// calls are wrapped in error scopes either way).
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue) -> Result<Self> {
        let info = device.adapter_info();
        Self::build(device, queue, info, Arc::new(Faults::default()))
    }

    fn build(
        device: wgpu::Device,
        queue: wgpu::Queue,
        info: wgpu::AdapterInfo,
        faults: Arc<Faults>,
    ) -> Result<Self> {
        let limits = device.limits();
        let workgroup_size = WORKGROUP_SIZE
            .min(limits.max_compute_invocations_per_workgroup)
            .min(limits.max_compute_workgroup_size_x);
        let workgroup_size = 1 << (31 - workgroup_size.leading_zeros());
        let scopes = Scopes::push(&device);
        let kernels = Kernels::new(&device, workgroup_size);
        scopes.pop(&faults)?;
        Ok(Self {
            device,
            queue,
            info,
            limits,
            kernels,
            workspace: Mutex::new(Workspace::default()),
            faults,
            timeout: Duration::from_secs(300),
        })
    }

    /// The adapter this context runs on.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// The device's limits.
    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }

    /// The wgpu device.
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// How long one wait for the GPU may take before [`Error::Timeout`] (default 300 s).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Number of GPU buffers this context has created so far. Repeated calls of the same
    /// shape create none.
    pub fn buffer_allocations(&self) -> u64 {
        self.workspace
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .allocations
    }

    /// Cross-entropy of `logits` ([rows, classes], row major) against class-index
    /// `targets` (one per row). The gradient, when [`LossOptions::gradient`] asks for it,
    /// comes back in [`LossOutput::gradient`].
    pub fn cross_entropy<'t>(
        &self,
        logits: &[f32],
        classes: usize,
        targets: impl Into<Targets<'t>>,
        opts: &LossOptions,
    ) -> Result<LossOutput> {
        let batch = Batch::new(logits.len(), classes, targets.into(), opts)?;
        if !opts.wants_gradient() {
            return self.run(Io::Loss(logits), &batch, opts);
        }
        let mut grad = vec![0.0f32; logits.len()];
        let mut out = self.run(Io::Separate(logits, &mut grad), &batch, opts)?;
        out.gradient = Some(grad);
        Ok(out)
    }

    /// As [`GpuContext::cross_entropy`], with the gradient written over `logits`
    /// (no second buffer of the logits' size on the host or the device).
    pub fn cross_entropy_in_place<'t>(
        &self,
        logits: &mut [f32],
        classes: usize,
        targets: impl Into<Targets<'t>>,
        opts: &LossOptions,
    ) -> Result<LossOutput> {
        let batch = Batch::new(logits.len(), classes, targets.into(), opts)?;
        self.run(Io::InPlace(logits), &batch, opts)
    }

    fn check_lost(&self) -> Result<()> {
        match self
            .faults
            .lost
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            Some(reason) => Err(Error::DeviceLost(reason.clone())),
            None => Ok(()),
        }
    }

    fn run(&self, mut io: Io<'_>, batch: &Batch, opts: &LossOptions) -> Result<LossOutput> {
        self.check_lost()?;
        if batch.rows == 0 {
            return Ok(empty_output(opts));
        }
        let plan = Plan::new(
            batch,
            opts,
            &self.limits,
            self.kernels.workgroup_size,
            io.grad_mode(),
        )?;
        let mut ws = self.workspace.lock().unwrap_or_else(|p| p.into_inner());
        let scopes = Scopes::push(&self.device);
        let result = self.run_locked(&mut ws, &mut io, batch, &plan);
        let scoped = scopes.pop(&self.faults);
        self.check_lost()?;
        scoped?;
        let (loss, row_losses, lse) = result?;
        Ok(LossOutput {
            loss: match opts.get_reduction() {
                Reduction::None => None,
                // 0/0: every row ignored.
                Reduction::Mean if batch.counted_rows == 0 => Some(f32::NAN),
                _ => Some(loss),
            },
            row_losses: opts.wants_row_losses().then_some(row_losses),
            lse: opts.wants_lse().then_some(lse),
            gradient: None,
        })
    }

    fn run_locked(
        &self,
        ws: &mut Workspace,
        io: &mut Io<'_>,
        batch: &Batch,
        plan: &Plan,
    ) -> Result<(f32, Vec<f32>, Vec<f32>)> {
        let (n, v) = (batch.rows, batch.classes);
        self.prepare(ws, plan);
        let ws = &*ws;
        self.queue
            .write_buffer(ws.targets.get(), 0, bytemuck::cast_slice(&batch.targets));
        for (level, p) in plan.levels.iter().enumerate() {
            self.queue.write_buffer(
                ws.params.get(),
                (level as u64 + 1) * plan.param_stride,
                bytemuck::bytes_of(p),
            );
        }

        let mut first = 0;
        while first < n {
            let rows = plan.rows_per_chunk.min(n - first);
            let elems = rows * v;
            let span = first * v..first * v + elems;
            self.queue.write_buffer(
                ws.logits.get(),
                0,
                bytemuck::cast_slice(&io.logits()[span.clone()]),
            );
            let groups = rows.div_ceil(plan.rows_per_group) as u64;
            let (gx, gy) = fold_groups(groups, self.limits.max_compute_workgroups_per_dimension);
            let params = RowParams {
                rows: rows as u32,
                classes: v as u32,
                row_base: first as u32,
                groups_x: gx,
                grad_scale: plan.grad_scale,
                grad_mode: plan.grad_mode as u32,
                ignore_index: Batch::IGNORED,
                threads_per_row: plan.threads_per_row,
            };
            self.queue
                .write_buffer(ws.params.get(), 0, bytemuck::bytes_of(&params));
            let mut enc = self.device.create_command_encoder(&Default::default());
            {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("cross_entropy_rows"),
                    timestamp_writes: None,
                });
                pass.set_pipeline(&self.kernels.rows.pipeline);
                pass.set_bind_group(0, ws.rows_bind_group.as_ref(), &[0]);
                pass.dispatch_workgroups(gx, gy, 1);
            }
            let grad_bytes = (elems * 4) as u64;
            let grad_src = match plan.grad_mode {
                GradMode::None => None,
                GradMode::Separate => Some(ws.grad.get()),
                GradMode::InPlace => Some(ws.logits.get()),
            };
            if let Some(src) = grad_src {
                enc.copy_buffer_to_buffer(src, 0, ws.readback.get(), 0, grad_bytes);
            }
            self.queue.submit([enc.finish()]);
            if let Some(dst) = io.grad_out() {
                self.read_back(ws.readback.get(), grad_bytes, |bytes| {
                    dst[span].copy_from_slice(bytemuck::cast_slice(bytes));
                })?;
            }
            first += rows;
        }

        // The reduction runs on the device: copy the row losses into the partials buffer
        // and add them up level by level.
        let mut enc = self.device.create_command_encoder(&Default::default());
        let row_bytes = (n * 4) as u64;
        enc.copy_buffer_to_buffer(ws.row_loss.get(), 0, ws.partials.get(), 0, row_bytes);
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("reduce_sum"),
                timestamp_writes: None,
            });
            pass.set_pipeline(&self.kernels.reduce.pipeline);
            for (level, p) in plan.levels.iter().enumerate() {
                let offset = (level as u64 + 1) * plan.param_stride;
                pass.set_bind_group(0, ws.reduce_bind_group.as_ref(), &[offset as u32]);
                let groups =
                    u64::from(p.count).div_ceil(2 * u64::from(self.kernels.workgroup_size));
                let (gx, gy) =
                    fold_groups(groups, self.limits.max_compute_workgroups_per_dimension);
                pass.dispatch_workgroups(gx, gy, 1);
            }
        }
        let total_at = u64::from(plan.levels.last().expect("at least one level").dst) * 4;
        enc.copy_buffer_to_buffer(ws.partials.get(), total_at, ws.readback.get(), 0, 4);
        let (loss_at, lse_at) = plan.readback_offsets(n);
        enc.copy_buffer_to_buffer(ws.row_loss.get(), 0, ws.readback.get(), loss_at, row_bytes);
        enc.copy_buffer_to_buffer(ws.row_lse.get(), 0, ws.readback.get(), lse_at, row_bytes);
        self.queue.submit([enc.finish()]);
        let mut result = (0.0, Vec::new(), Vec::new());
        self.read_back(ws.readback.get(), lse_at + row_bytes, |bytes| {
            let floats: &[f32] = bytemuck::cast_slice(bytes);
            result.0 = floats[0];
            let (l, e) = ((loss_at / 4) as usize, (lse_at / 4) as usize);
            result.1 = floats[l..l + n].to_vec();
            result.2 = floats[e..e + n].to_vec();
        })?;
        Ok(result)
    }

    /// Makes every buffer of the workspace big enough for `plan`, rebuilding the bind
    /// groups only when a buffer was replaced.
    fn prepare(&self, ws: &mut Workspace, plan: &Plan) {
        use wgpu::BufferUsages as U;
        let d = &self.device;
        let bind_cap = self
            .limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size);
        let buf_cap = self.limits.max_buffer_size;
        let storage = U::STORAGE | U::COPY_SRC | U::COPY_DST;
        let grad_bytes = if plan.grad_mode == GradMode::Separate {
            plan.chunk_bytes
        } else {
            4
        };
        let changed = [
            ws.logits
                .ensure(d, "xent logits", storage, plan.chunk_bytes, bind_cap),
            ws.targets
                .ensure(d, "xent targets", storage, plan.row_bytes, bind_cap),
            ws.row_loss
                .ensure(d, "xent row_loss", storage, plan.row_bytes, bind_cap),
            ws.row_lse
                .ensure(d, "xent row_lse", storage, plan.row_bytes, bind_cap),
            ws.grad
                .ensure(d, "xent grad", storage, grad_bytes, bind_cap),
        ];
        let reduce_changed = [
            ws.partials
                .ensure(d, "xent partials", storage, plan.partials_bytes, bind_cap),
            ws.params.ensure(
                d,
                "xent params",
                U::UNIFORM | U::COPY_DST,
                plan.param_stride * PARAM_SLOTS,
                buf_cap,
            ),
        ];
        let readback_changed = ws.readback.ensure(
            d,
            "xent readback",
            U::MAP_READ | U::COPY_DST,
            plan.readback_bytes,
            buf_cap,
        );
        let created = changed
            .iter()
            .chain(&reduce_changed)
            .filter(|&&c| c)
            .count() as u64
            + u64::from(readback_changed);
        ws.allocations += created;
        fn params_binding(buffer: &wgpu::Buffer, size: usize) -> wgpu::BindingResource<'_> {
            wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer,
                offset: 0,
                size: wgpu::BufferSize::new(size as u64),
            })
        }
        if ws.rows_bind_group.is_none() || changed.contains(&true) || reduce_changed[1] {
            let entries = [
                params_binding(ws.params.get(), size_of::<RowParams>()),
                ws.logits.get().as_entire_binding(),
                ws.targets.get().as_entire_binding(),
                ws.row_loss.get().as_entire_binding(),
                ws.row_lse.get().as_entire_binding(),
                ws.grad.get().as_entire_binding(),
            ];
            ws.rows_bind_group = Some(bind_group(d, &self.kernels.rows.layout, &entries));
        }
        if ws.reduce_bind_group.is_none() || reduce_changed.contains(&true) {
            let entries = [
                params_binding(ws.params.get(), size_of::<ReduceParams>()),
                ws.partials.get().as_entire_binding(),
            ];
            ws.reduce_bind_group = Some(bind_group(d, &self.kernels.reduce.layout, &entries));
        }
    }

    /// Maps `buffer[..size]`, waits for the GPU, and hands the bytes to `read`.
    fn read_back(&self, buffer: &wgpu::Buffer, size: u64, read: impl FnOnce(&[u8])) -> Result<()> {
        let slice = buffer.slice(0..size);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        let waited = self.device.poll(wgpu::PollType::Wait {
            submission_index: None,
            timeout: Some(self.timeout),
        });
        if let Err(e) = waited {
            self.check_lost()?;
            return Err(match e {
                wgpu::PollError::Timeout => Error::Timeout(self.timeout),
                other => Error::Gpu(other.to_string()),
            });
        }
        match rx.try_recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                self.check_lost()?;
                return Err(Error::Gpu(format!("reading results back failed: {e}")));
            }
            Err(_) => {
                self.check_lost()?;
                return Err(Error::Gpu(
                    "the GPU finished but the results were never mapped".into(),
                ));
            }
        }
        {
            let view = slice
                .get_mapped_range()
                .map_err(|e| Error::Gpu(format!("reading results back failed: {e}")))?;
            read(&view);
        }
        buffer.unmap();
        Ok(())
    }
}

fn bind_group(
    device: &wgpu::Device,
    layout: &wgpu::BindGroupLayout,
    resources: &[wgpu::BindingResource<'_>],
) -> wgpu::BindGroup {
    let entries: Vec<_> = resources
        .iter()
        .enumerate()
        .map(|(i, r)| wgpu::BindGroupEntry {
            binding: i as u32,
            resource: r.clone(),
        })
        .collect();
    device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout,
        entries: &entries,
    })
}

/// Splits `groups` workgroups into a 2D grid within the per-dimension limit.
fn fold_groups(groups: u64, max_per_dim: u32) -> (u32, u32) {
    let x = groups.min(u64::from(max_per_dim)).max(1);
    (x as u32, groups.div_ceil(x) as u32)
}

fn empty_output(opts: &LossOptions) -> LossOutput {
    LossOutput {
        loss: match opts.get_reduction() {
            Reduction::None => None,
            Reduction::Sum => Some(0.0),
            Reduction::Mean => Some(f32::NAN),
        },
        row_losses: opts.wants_row_losses().then(Vec::new),
        lse: opts.wants_lse().then(Vec::new),
        gradient: opts.wants_gradient().then(Vec::new),
    }
}

/// How one call is cut into chunks of whole rows and reduction levels; a pure function
/// of the shape, the options and the device limits.
struct Plan {
    /// Invocations per row (a power of two up to the workgroup size).
    threads_per_row: u32,
    /// Rows per workgroup (workgroup size / threads_per_row).
    rows_per_group: usize,
    rows_per_chunk: usize,
    chunk_bytes: u64,
    row_bytes: u64,
    partials_bytes: u64,
    readback_bytes: u64,
    param_stride: u64,
    grad_scale: f32,
    grad_mode: GradMode,
    levels: Vec<ReduceParams>,
}

impl Plan {
    fn new(
        batch: &Batch,
        opts: &LossOptions,
        limits: &wgpu::Limits,
        workgroup_size: u32,
        grad_mode: GradMode,
    ) -> Result<Self> {
        let (n, v) = (batch.rows as u64, batch.classes as u64);
        let bind_cap = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        let hint = "max_storage_buffer_binding_size; splitting rows across bindings is not supported on this path";
        let one_row = v * 4;
        if one_row > bind_cap {
            return Err(Error::TooLarge {
                what: format!("one row of {v} classes"),
                needed: one_row,
                limit: bind_cap,
                hint: hint.into(),
            });
        }
        let row_bytes = n * 4;
        if row_bytes > bind_cap {
            return Err(Error::TooLarge {
                what: format!("per-row results of {n} rows"),
                needed: row_bytes,
                limit: bind_cap,
                hint: hint.into(),
            });
        }
        // About four elements per invocation at least: short rows share a workgroup.
        let threads_per_row = match (v / 4).min(u64::from(workgroup_size)) {
            0 => 1,
            t => 1u32 << (63 - t.leading_zeros()),
        };
        let rows_per_group = u64::from(workgroup_size / threads_per_row);
        let max_dim = u64::from(limits.max_compute_workgroups_per_dimension);
        let rows_per_chunk = (bind_cap / one_row)
            .min(n)
            .min(max_dim * max_dim * rows_per_group)
            .min(u64::from(u32::MAX));
        let chunk_bytes = rows_per_chunk * one_row;

        let per_group = 2 * u64::from(workgroup_size);
        let mut levels = Vec::new();
        let (mut count, mut src) = (n, 0u64);
        loop {
            let groups = count.div_ceil(per_group);
            let dst = src + count;
            levels.push(ReduceParams {
                count: count as u32,
                src: src as u32,
                dst: dst as u32,
                groups_x: fold_groups(groups, limits.max_compute_workgroups_per_dimension).0,
                divisor: 1.0,
                last: 0,
                _pad0: 0,
                _pad1: 0,
            });
            if groups == 1 {
                break;
            }
            (count, src) = (groups, dst);
        }
        let divisor = batch.divisor(opts.get_reduction());
        let last = levels.last_mut().expect("one level at least");
        last.last = 1;
        last.divisor = if divisor > 0.0 { divisor as f32 } else { 1.0 };
        let partials_bytes = (u64::from(last.dst) + 1) * 4;
        if levels.len() as u64 >= PARAM_SLOTS {
            return Err(Error::TooLarge {
                what: format!("a reduction over {n} rows"),
                needed: row_bytes,
                limit: bind_cap,
                hint: "too many reduction levels".into(),
            });
        }
        let param_stride = (size_of::<RowParams>() as u64)
            .max(size_of::<ReduceParams>() as u64)
            .next_multiple_of(u64::from(limits.min_uniform_buffer_offset_alignment));
        let mut plan = Self {
            threads_per_row,
            rows_per_group: rows_per_group as usize,
            rows_per_chunk: rows_per_chunk as usize,
            chunk_bytes,
            row_bytes,
            partials_bytes,
            readback_bytes: 0,
            param_stride,
            grad_scale: if divisor > 0.0 {
                (1.0 / divisor) as f32
            } else {
                0.0
            },
            grad_mode,
            levels,
        };
        let (_, lse_at) = plan.readback_offsets(batch.rows);
        let grad_readback = if grad_mode == GradMode::None {
            0
        } else {
            chunk_bytes
        };
        plan.readback_bytes = grad_readback.max(lse_at + row_bytes);
        Ok(plan)
    }

    /// Offsets in the readback buffer of the row losses and the row LSE (the reduced loss
    /// is at 0).
    fn readback_offsets(&self, n: usize) -> (u64, u64) {
        let loss_at = 8;
        (loss_at, (loss_at + n as u64 * 4).next_multiple_of(8))
    }
}

/// The three error scopes that wrap every call, so that wgpu errors come back as values.
struct Scopes([wgpu::ErrorScopeGuard; 3]);

impl Scopes {
    fn push(device: &wgpu::Device) -> Self {
        Self([
            device.push_error_scope(wgpu::ErrorFilter::Validation),
            device.push_error_scope(wgpu::ErrorFilter::OutOfMemory),
            device.push_error_scope(wgpu::ErrorFilter::Internal),
        ])
    }

    fn pop(self, faults: &Faults) -> Result<()> {
        let [validation, oom, internal] = self.0;
        let internal = pollster::block_on(internal.pop());
        let oom = pollster::block_on(oom.pop());
        let validation = pollster::block_on(validation.pop());
        if let Some(reason) = faults
            .lost
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            return Err(Error::DeviceLost(reason.clone()));
        }
        if let Some(e) = oom {
            return Err(Error::OutOfMemory(e.to_string()));
        }
        if let Some(e) = validation.or(internal) {
            return Err(Error::Gpu(e.to_string()));
        }
        Ok(())
    }
}
