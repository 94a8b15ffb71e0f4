//! A loss module built like burn's `CrossEntropyLoss`: a config, `init(&device)`,
//! `forward(logits, targets)`.

use burn::tensor::{Device, Int, Tensor};
use xent::{LossOptions, Reduction};

/// Configuration of [`CrossEntropyLoss`]: every [`LossOptions`] option (PyTorch's defaults
/// unless set: `mean`, `ignore_index` −100, no weights or smoothing).
#[derive(Clone, Debug, Default)]
pub struct CrossEntropyLossConfig {
    opts: LossOptions,
}

impl CrossEntropyLossConfig {
    /// PyTorch's defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// All options at once.
    pub fn with_options(self, opts: LossOptions) -> Self {
        Self { opts }
    }

    /// Rows whose target is `index` are left out (burn's `pad_tokens`, PyTorch's
    /// `ignore_index`).
    pub fn with_ignore_index(self, index: i64) -> Self {
        Self { opts: self.opts.ignore_index(index) }
    }

    /// One weight per class.
    pub fn with_weights(self, weights: Vec<f32>) -> Self {
        Self { opts: self.opts.weights(weights) }
    }

    /// Label smoothing ε ∈ [0, 1].
    pub fn with_label_smoothing(self, eps: f64) -> Self {
        Self { opts: self.opts.label_smoothing(eps) }
    }

    /// `mean`, `sum` or `none`.
    pub fn with_reduction(self, reduction: Reduction) -> Self {
        Self { opts: self.opts.reduction(reduction) }
    }

    /// z-loss scale s (PaLM).
    pub fn with_z_loss(self, s: f64) -> Self {
        Self { opts: self.opts.z_loss(s) }
    }

    /// Logit softcap c (Gemma 2).
    pub fn with_softcap(self, c: f64) -> Self {
        Self { opts: self.opts.softcap(c) }
    }

    /// Logit scale α.
    pub fn with_logit_scale(self, a: f64) -> Self {
        Self { opts: self.opts.logit_scale(a) }
    }

    /// The `mean` denominator, for gradient accumulation over micro-batches.
    pub fn with_n_items(self, n: f64) -> Self {
        Self { opts: self.opts.n_items(n) }
    }

    /// The loss module (the device is where its tensors will be; xent's kernels run
    /// where [`crate::is_accelerated`] says so).
    pub fn init(&self, _device: &Device) -> CrossEntropyLoss {
        CrossEntropyLoss { opts: self.opts.clone() }
    }
}

/// Fused cross-entropy as a module: [`crate::cross_entropy`] with its config's options.
#[derive(Clone, Debug)]
pub struct CrossEntropyLoss {
    opts: LossOptions,
}

impl CrossEntropyLoss {
    /// The loss of `logits` [N, V] against class indices `targets` [N]: [1] for `mean`
    /// and `sum`, [N] for `none`.
    pub fn forward(&self, logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
        crate::cross_entropy(logits, targets, &self.opts)
    }

    /// The options in use.
    pub fn options(&self) -> &LossOptions {
        &self.opts
    }
}
