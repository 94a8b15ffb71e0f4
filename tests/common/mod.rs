//! Shared by the GPU test binaries: one context per adapter, opened once per binary.
#![allow(dead_code)]

use std::sync::OnceLock;

use xent::GpuContext;

/// Every adapter of the machine (or those whose name contains `XENT_ADAPTER`), each with
/// a context. Empty only when the user opted out with `XENT_SKIP_GPU=1`; with no
/// adapter and no opt-out the test fails and says how to get one.
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
                GpuContext::from_adapter_blocking(a)
                    .unwrap_or_else(|e| panic!("opening {}: {e}", a.get_info().name))
            })
            .collect()
    });
    if gpus.is_empty() {
        eprintln!("SKIPPED {test}: XENT_SKIP_GPU=1 (no GPU test ran)");
    }
    gpus
}

/// Name of a context for failure messages.
pub fn name(gpu: &GpuContext) -> String {
    let i = gpu.adapter_info();
    format!("{} ({:?})", i.name, i.backend)
}
