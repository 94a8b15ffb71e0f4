//! [`GpuContext`]: a device, its cached pipelines and reusable buffers; how it is opened,
//! and how GPU faults come back as typed errors.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::{Error, Result};

use super::kernels::Kernels;
use super::plan::{DEFAULT_BUDGET, DEFAULT_RING, PlanLimits};
use super::tuning::Tuning;
use super::workspace::Workspace;

/// What went wrong outside an error scope: set by the device-lost callback and the
/// uncaptured-error handler, read before and after every call.
#[derive(Default)]
pub(crate) struct Faults {
    pub lost: Mutex<Option<String>>,
    pub uncaptured: Mutex<Vec<String>>,
}

/// A GPU device with the xent kernels built for it.
///
/// Create one per device and keep it: pipelines are built once, and buffers are reused
/// across calls (repeated calls of one shape create no new buffer). Host arrays of any
/// size are streamed through the device in chunks planned by [`super::Plan`] within the
/// device's limits and a memory budget. It is `Send + Sync`; calls from several threads
/// are serialised on its workspace.
///
/// ```no_run
/// use xent::{BackendExt, GpuContext, LossOptions};
/// let gpu = GpuContext::new_blocking()?;
/// let logits = vec![0.5f32, 1.5, -1.0, 2.0, 0.0, 0.0];
/// let out = gpu.cross_entropy_with_grad(&logits, 3, &[1i64, 0], &LossOptions::new())?;
/// println!("loss {:?} on {}", out.loss, gpu.adapter_info().name);
/// # Ok::<(), xent::Error>(())
/// ```
pub struct GpuContext {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    pub(crate) limits: wgpu::Limits,
    pub(crate) kernels: Kernels,
    pub(crate) workspace: Mutex<Workspace>,
    faults: Arc<Faults>,
    pub(crate) timeout: Duration,
    pub(crate) budget: u64,
    pub(crate) ring: usize,
    /// The kernels' shape (see [`Tuning`]).
    pub(crate) tuning: Tuning,
    /// Out-of-memory errors still to inject (tests of the retry path).
    injected_oom: std::sync::atomic::AtomicU32,
    /// Poll timeouts still to inject (tests of the recovery path).
    injected_timeouts: std::sync::atomic::AtomicU32,
}

/// The backends in the order [`GpuContext::new`] tries them: those with native compute
/// (Vulkan, Metal, DX12) first, GL only when none of them has an adapter. `WGPU_BACKEND`
/// (a comma list, e.g. `gl`) narrows them.
fn backend_groups() -> Vec<wgpu::Backends> {
    let wanted = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::all())
        & wgpu::Instance::enabled_backend_features();
    let first = wanted & wgpu::Backends::PRIMARY;
    [first, wanted - first].into_iter().filter(|b| !b.is_empty()).collect()
}

/// Instances over `backends`, honouring the `WGPU_*` settings: Vulkan's on its own
/// where [`compute_vulkan`] makes it, the rest in one.
fn instances(mut backends: wgpu::Backends) -> Vec<wgpu::Instance> {
    let mut out = Vec::new();
    if backends.contains(wgpu::Backends::VULKAN)
        && let Some(vulkan) = compute_vulkan()
    {
        backends.remove(wgpu::Backends::VULKAN);
        out.push(vulkan);
    }
    if !backends.is_empty() {
        let desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        out.push(wgpu::Instance::new(wgpu::InstanceDescriptor { backends, ..desc }));
    }
    out
}

/// A Vulkan instance without the window-system extensions (xent presents nothing).
///
/// wgpu enables `VK_KHR_wayland_surface` and `VK_KHR_xcb_surface` wherever the driver has
/// them, and Mesa's device-selection layer (`VK_LAYER_MESA_device_select`, installed with
/// the Mesa Vulkan drivers) then connects to the Wayland and X displays on every
/// `vkEnumeratePhysicalDevices` to find the one driving the screen. Without
/// `XDG_RUNTIME_DIR` libwayland prints `error: XDG_RUNTIME_DIR is invalid or not set in
/// the environment.` to stderr on each try: twice per adapter request. Without those
/// extensions the layer does not look.
///
/// `None` where the instance cannot be made so (then wgpu's own is used): outside Linux
/// and the BSDs, when `WGPU_VALIDATION`, `WGPU_DEBUG` or another instance flag is set
/// (the core instance that [`wgpu::Instance::from_hal`] builds keeps wgpu's default
/// flags), and without a Vulkan loader.
#[cfg(all(unix, not(target_vendor = "apple"), not(target_os = "android"), not(target_os = "netbsd")))]
fn compute_vulkan() -> Option<wgpu::Instance> {
    use wgpu::hal;
    let flags = wgpu::InstanceFlags::default().with_env();
    if flags != wgpu::InstanceFlags::default() {
        return None;
    }
    let desc = hal::InstanceDescriptor {
        name: "wgpu",
        flags,
        memory_budget_thresholds: wgpu::MemoryBudgetThresholds::default(),
        backend_options: wgpu::BackendOptions::from_env_or_default(),
        telemetry: None,
        display: None,
    };
    const WSI: [&std::ffi::CStr; 3] =
        [c"VK_KHR_wayland_surface", c"VK_KHR_xcb_surface", c"VK_KHR_xlib_surface"];
    let without_wsi: Box<hal::vulkan::CreateInstanceCallback<'_>> = Box::new(|args| {
        args.extensions.retain(|e| !WSI.contains(e));
    });
    // SAFETY: the callback only takes out the three window-system surface extensions.
    // wgpu-hal asks callbacks not to remove extensions because it may assume that an
    // extension the driver offers is enabled; it makes no such assumption about these
    // three: each is used only by its `create_surface_from_*`, which checks the
    // instance's enabled extensions first and returns an error without it (wgpu-hal
    // 30.0.2, src/vulkan/instance.rs). xent creates no surfaces.
    let raw = unsafe { hal::vulkan::Instance::init_with_callback(&desc, Some(without_wsi)) }.ok()?;
    // SAFETY: a valid instance just created, handed over whole.
    Some(unsafe { wgpu::Instance::from_hal::<hal::api::Vulkan>(raw) })
}

/// Elsewhere wgpu's own Vulkan instance is used.
#[cfg(not(all(unix, not(target_vendor = "apple"), not(target_os = "android"), not(target_os = "netbsd"))))]
fn compute_vulkan() -> Option<wgpu::Instance> {
    None
}

/// A wgpu instance for compute, over the backends [`GpuContext::new`] takes its adapter
/// from: Vulkan, Metal or DX12 when one of them has an adapter, GL otherwise
/// (`WGPU_BACKEND` chooses others). Its Vulkan instance enables no window-system
/// extension on Linux and the BSDs (see [`GpuContext::new`]); [`adapters`] lists every
/// backend's adapters.
pub fn instance() -> wgpu::Instance {
    let mut fallback = None;
    for group in backend_groups() {
        for instance in instances(group) {
            if !pollster::block_on(instance.enumerate_adapters(group)).is_empty() {
                return instance;
            }
            fallback.get_or_insert(instance);
        }
    }
    fallback.unwrap_or_else(|| {
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env())
    })
}

/// Every adapter wgpu finds on this machine, over all backends (those of `WGPU_BACKEND`
/// when it is set): Vulkan, Metal and DX12 ones first, then GL.
pub async fn adapters() -> Vec<wgpu::Adapter> {
    let mut all = Vec::new();
    for group in backend_groups() {
        for instance in instances(group) {
            all.extend(instance.enumerate_adapters(group).await);
        }
    }
    all
}

/// The adapters whose name contains `name` (case-insensitive); all of them for `None`.
/// Fails with [`Error::NoAdapter`] when none matches.
pub fn select_adapters(name: Option<&str>) -> Result<Vec<wgpu::Adapter>> {
    let all = pollster::block_on(adapters());
    if all.is_empty() {
        return Err(Error::NoAdapter { detail: String::new() });
    }
    let Some(name) = name else { return Ok(all) };
    let needle = name.to_lowercase();
    let names: Vec<String> =
        all.iter().map(|a| format!("{} ({:?})", a.get_info().name, a.get_info().backend)).collect();
    let chosen: Vec<_> = all
        .into_iter()
        .filter(|a| {
            let i = a.get_info();
            format!("{} ({:?})", i.name, i.backend).to_lowercase().contains(&needle)
        })
        .collect();
    if chosen.is_empty() {
        return Err(Error::NoAdapter { detail: format!(" matching '{name}' (found: {})", names.join(", ")) });
    }
    Ok(chosen)
}

impl GpuContext {
    /// Opens the default (high-performance) adapter of the first backends that have one:
    /// Vulkan, Metal or DX12, else GL (`WGPU_BACKEND` chooses others). Only that adapter
    /// is opened: the GL backend is not even started when another has an adapter (so a
    /// machine whose only Vulkan adapter is a software one, such as lavapipe, gets that
    /// one even if GL reaches a GPU: choose it with [`select_adapters`] or `WGPU_BACKEND=gl`).
    ///
    /// On Linux and the BSDs the Vulkan instance enables no window-system extension, so
    /// that Mesa's device-selection layer does not look for a Wayland or X display (without
    /// `XDG_RUNTIME_DIR`, libwayland complains on stderr when it cannot).
    pub async fn new() -> Result<Self> {
        let options = wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            ..Default::default()
        };
        let mut failure = String::new();
        for group in backend_groups() {
            for instance in instances(group) {
                match instance.request_adapter(&options).await {
                    Ok(adapter) => return Self::from_adapter(&adapter).await,
                    Err(e) => failure = format!(" ({e})"),
                }
            }
        }
        Err(Error::NoAdapter { detail: failure })
    }

    /// Blocking form of [`GpuContext::new`].
    pub fn new_blocking() -> Result<Self> {
        pollster::block_on(Self::new())
    }

    /// Opens a device on `adapter` with the adapter's own limits (the defaults are much
    /// smaller than what large batches need).
    pub async fn from_adapter(adapter: &wgpu::Adapter) -> Result<Self> {
        let wanted = wgpu::Features::SUBGROUP | wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::SHADER_F16;
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
                Error::Gpu(format!("could not open a device on {}: {e}", adapter.get_info().name))
            })?;
        let faults = Arc::new(Faults::default());
        let f = faults.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            f.uncaptured.lock().unwrap_or_else(|p| p.into_inner()).push(e.to_string());
        }));
        let f = faults.clone();
        device.set_device_lost_callback(move |reason, message| {
            *f.lost.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("{reason:?}: {message}"));
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

    /// As [`GpuContext::from_adapter`], with explicit kernel tuning.
    pub async fn from_adapter_tuned(adapter: &wgpu::Adapter, tuning: Tuning) -> Result<Self> {
        let mut ctx = Self::from_adapter(adapter).await?;
        ctx.retune(tuning)?;
        Ok(ctx)
    }

    /// As [`GpuContext::from_device`], with explicit kernel tuning.
    pub fn from_device_tuned(device: wgpu::Device, queue: wgpu::Queue, tuning: Tuning) -> Result<Self> {
        let mut ctx = Self::from_device(device, queue)?;
        ctx.retune(tuning)?;
        Ok(ctx)
    }

    /// The kernel tuning in use.
    pub fn tuning(&self) -> Tuning {
        self.tuning
    }

    fn retune(&mut self, tuning: Tuning) -> Result<()> {
        let tuning = tuning.within(&self.limits);
        let scopes = Scopes::push(&self.device);
        let kernels = Kernels::new(&self.device, &tuning);
        scopes.pop(&self.faults)?;
        self.kernels = kernels;
        self.tuning = tuning;
        *self.workspace.lock().unwrap_or_else(|p| p.into_inner()) = Workspace::default();
        Ok(())
    }

    fn build(
        device: wgpu::Device,
        queue: wgpu::Queue,
        info: wgpu::AdapterInfo,
        faults: Arc<Faults>,
    ) -> Result<Self> {
        let limits = device.limits();
        let tuning = Tuning::for_adapter(&info).within(&limits);
        let scopes = Scopes::push(&device);
        let kernels = Kernels::new(&device, &tuning);
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
            budget: DEFAULT_BUDGET,
            ring: DEFAULT_RING,
            tuning,
            injected_oom: std::sync::atomic::AtomicU32::new(0),
            injected_timeouts: std::sync::atomic::AtomicU32::new(0),
        })
    }

    /// The adapter this context runs on.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// Whether f16 logits are read as WGSL `f16` (the device has `SHADER_F16`) rather than
    /// unpacked from u32 words; [`Tuning::portable_f16`] (`XENT_PORTABLE_F16=1`) forces
    /// the portable reader.
    pub fn native_f16(&self) -> bool {
        self.device.features().contains(wgpu::Features::SHADER_F16) && !self.tuning.portable_f16
    }

    /// The device's limits.
    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }

    /// The wgpu device.
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// The wgpu queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// How long one wait for the GPU may take before [`Error::Timeout`] (default 300 s).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Device bytes that the chunks in flight of one call may use together (default
    /// 1 GiB). Smaller budgets mean smaller chunks; rows that do not fit are split into
    /// column pieces.
    pub fn set_memory_budget(&mut self, bytes: u64) {
        self.budget = bytes;
    }

    /// Chunks in flight at once (default 2: one uploads or downloads while the other
    /// computes).
    pub fn set_chunks_in_flight(&mut self, ring: usize) {
        self.ring = ring.max(1);
    }

    /// The limits that plan this context's calls.
    pub fn plan_limits(&self) -> PlanLimits {
        PlanLimits { budget: self.budget, ring: self.ring, ..PlanLimits::of(&self.limits, self.tuning) }
    }

    /// Number of GPU buffers this context has created so far. Repeated calls of the same
    /// shape create none.
    pub fn buffer_allocations(&self) -> u64 {
        self.workspace.lock().unwrap_or_else(|p| p.into_inner()).allocations
    }

    /// Makes the next `times` buffer preparations fail as if the device were out of
    /// memory: for testing the retry with smaller chunks.
    #[doc(hidden)]
    pub fn inject_out_of_memory(&self, times: u32) {
        self.injected_oom.store(times, std::sync::atomic::Ordering::SeqCst);
    }

    /// Makes the next `times` waits for the GPU report a timeout: for testing the
    /// recovery on adapters that finish work before they can be polled (lavapipe
    /// executes submissions synchronously).
    #[doc(hidden)]
    pub fn inject_timeout(&self, times: u32) {
        self.injected_timeouts.store(times, std::sync::atomic::Ordering::SeqCst);
    }

    pub(crate) fn take_injected_oom(&self) -> Result<()> {
        match take_one(&self.injected_oom) {
            true => Err(Error::OutOfMemory("injected for testing".into())),
            false => Ok(()),
        }
    }

    /// Destroys the device, as a driver reset would: every later call fails with
    /// [`Error::DeviceLost`]; build a new context to continue.
    pub fn destroy_device(&self) {
        self.device.destroy();
        let _ = self.device.poll(wgpu::PollType::Poll);
        let mut lost = self.faults.lost.lock().unwrap_or_else(|p| p.into_inner());
        lost.get_or_insert_with(|| "the device was destroyed".into());
    }

    pub(crate) fn check_lost(&self) -> Result<()> {
        match self.faults.lost.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some(reason) => Err(Error::DeviceLost(reason.clone())),
            None => Ok(()),
        }
    }

    /// Runs `work` inside error scopes; a wgpu error or a lost device wins over the
    /// work's own result, since it is the cause.
    pub(crate) fn scoped<T>(&self, work: impl FnOnce() -> Result<T>) -> Result<T> {
        self.check_lost()?;
        let scopes = Scopes::push(&self.device);
        let result = work();
        let scoped = scopes.pop(&self.faults);
        self.check_lost()?;
        scoped?;
        result
    }

    /// Waits for `submission` (or everything, for `None`), at most the context's timeout.
    pub(crate) fn wait(&self, submission: Option<wgpu::SubmissionIndex>) -> Result<()> {
        if take_one(&self.injected_timeouts) {
            return Err(Error::Timeout(self.timeout));
        }
        let waited = self
            .device
            .poll(wgpu::PollType::Wait { submission_index: submission, timeout: Some(self.timeout) });
        match waited {
            // Waiting for everything reports an unfinished queue as `Poll`, not an error.
            Ok(wgpu::PollStatus::Poll) => Err(Error::Timeout(self.timeout)),
            Ok(_) => Ok(()),
            Err(e) => {
                self.check_lost()?;
                Err(match e {
                    wgpu::PollError::Timeout => Error::Timeout(self.timeout),
                    other => Error::Gpu(other.to_string()),
                })
            }
        }
    }

    /// Asks for `buffer[..size]` to be mapped for reading once the GPU is done with it.
    pub(crate) fn request_map(&self, buffer: &wgpu::Buffer, size: u64) -> MapRequest {
        let (tx, rx) = std::sync::mpsc::channel();
        buffer.slice(0..size).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        MapRequest { rx, size }
    }

    /// Waits for a mapping requested after `submission`, hands the bytes to `read`, unmaps.
    pub(crate) fn finish_map(
        &self,
        buffer: &wgpu::Buffer,
        request: MapRequest,
        submission: Option<wgpu::SubmissionIndex>,
        read: impl FnOnce(&[u8]),
    ) -> Result<()> {
        self.wait(submission)?;
        // The callback runs inside some thread's poll: ours, or another thread's that
        // polled the same device a moment earlier and is about to deliver it.
        let deadline = std::time::Instant::now() + self.timeout;
        let status = loop {
            match request.rx.recv_timeout(Duration::from_millis(1)) {
                Ok(status) => break Ok(status),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break Err(()),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if std::time::Instant::now() > deadline {
                        return Err(Error::Timeout(self.timeout));
                    }
                    self.check_lost()?;
                    let _ = self.device.poll(wgpu::PollType::Poll);
                }
            }
        };
        match status {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                self.check_lost()?;
                return Err(Error::Gpu(format!("reading results back failed: {e}")));
            }
            Err(_) => {
                self.check_lost()?;
                return Err(Error::Gpu("the GPU finished but the results were never mapped".into()));
            }
        }
        {
            let view = buffer
                .slice(0..request.size)
                .get_mapped_range()
                .map_err(|e| Error::Gpu(format!("reading results back failed: {e}")))?;
            read(&view);
        }
        buffer.unmap();
        Ok(())
    }
}

/// The gradient output must match the logits.
pub(crate) fn check_grad_len(grad: usize, logits: usize) -> Result<()> {
    if grad != logits {
        return Err(Error::Shape { what: "gradient output".into(), got: grad, expected: logits });
    }
    Ok(())
}

/// Takes one from a countdown; false when it is already 0.
fn take_one(counter: &std::sync::atomic::AtomicU32) -> bool {
    use std::sync::atomic::Ordering;
    counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
}

/// A pending `map_async`.
pub(crate) struct MapRequest {
    rx: std::sync::mpsc::Receiver<std::result::Result<(), wgpu::BufferAsyncError>>,
    size: u64,
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
        if let Some(reason) = faults.lost.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
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
