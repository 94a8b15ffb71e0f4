//! The command line's shape (clap) and the checks of `eval`'s options, apart from any
//! I/O, so that the fuzz target in `fuzz/` can drive them.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use xent::{Error, LossOptions, Reduction};

#[derive(Parser)]
#[command(
    name = "xent",
    version,
    about = "Fused log-softmax + cross-entropy on wgpu, checked against an f64 CPU reference"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// List every adapter wgpu finds, with the limits and features that matter here.
    Info,
    /// Run the built-in conformance set on every adapter against the CPU reference.
    Check {
        /// Only adapters whose name contains this (case-insensitive).
        #[arg(long)]
        adapter: Option<String>,
    },
    /// Evaluate the loss of a saved batch.
    Eval(Box<EvalArgs>),
    /// Time the GPU kernels (against an in-run copy kernel) and the fast CPU path.
    Bench(BenchArgs),
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchDevice {
    Gpu,
    Cpu,
    All,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PassArg {
    Forward,
    ForwardBackward,
    All,
}

/// An option set of `xent bench --options`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OptionSet {
    /// No option: PyTorch's defaults (always measured: the ratios divide by it).
    Plain,
    /// Label smoothing 0.1.
    Smoothing,
    /// Logit softcap 30 (Gemma 2).
    Softcap,
    /// Class weights (0.5 to 1.4, one per class).
    Weights,
    /// z-loss 1e-4 (PaLM).
    ZLoss,
    /// Logit scale 0.5.
    Scale,
    /// Class weights, label smoothing 0.1, softcap 30 and z-loss 1e-4 together.
    All,
    /// The plain loss with the evaluation metrics beside it (top-1 and top-5, 15 bins).
    Metrics,
    /// Softcap 30 with the evaluation metrics (against `softcap`: what the metrics cost
    /// on a transformed row).
    SoftcapMetrics,
}

#[derive(clap::Args)]
pub struct BenchArgs {
    #[arg(long, value_enum, default_value = "all")]
    pub device: BenchDevice,
    /// Rows of a synthetic batch (with --classes); default: a set of realistic shapes.
    #[arg(long, requires = "classes")]
    pub rows: Option<usize>,
    /// Classes of a synthetic batch (with --rows).
    #[arg(long, requires = "rows")]
    pub classes: Option<usize>,
    #[arg(long, value_enum, default_value = "all")]
    pub pass: PassArg,
    /// Timed repetitions per measurement (after 2 warm-up runs).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub iters: u64,
    /// Adapter name (substring, case-insensitive); default: the high-performance one.
    #[arg(long)]
    pub adapter: Option<String>,
    /// Print one JSON array instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Option sets to time, comma-separated or repeated (--options plain,softcap,all or
    /// --options softcap --options all), each on every device, shape and pass; each row's
    /// ÷plain (JSON: ratio_to_plain) is its median time over the plain loss's in the same
    /// run, which is measured too when not listed.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "plain")]
    pub options: Vec<OptionSet>,
    /// Time the fused linear head + cross-entropy (h [N, D], W [V, D], b [V]) through the
    /// front door instead: --rows, --hidden-dim and --classes together pick one shape.
    #[arg(long)]
    pub linear: bool,
    /// Hidden dimension D of --linear (with --rows and --classes).
    #[arg(long, requires = "linear", value_parser = clap::value_parser!(u64).range(1..))]
    pub hidden_dim: Option<u64>,
    /// Also time the loss with the evaluation metrics (top-1/5, 15 bins) beside it (the
    /// option set "metrics", as `--options metrics`), to show what asking for them costs.
    #[arg(long)]
    pub metrics: bool,
    /// Draw the measured throughput (and the copy/read rooflines of each adapter) as an
    /// SVG picture at this path.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// The GPU's memory budget in MiB (`GpuContext::set_memory_budget`; default 1024):
    /// smaller budgets mean smaller chunks.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub memory_budget: Option<u64>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    Gpu,
    Cpu,
    Reference,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LossKind {
    Ce,
    Bce,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReductionArg {
    Mean,
    Sum,
    None,
}

/// How `eval --parallel` shards a problem over the ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ParallelArg {
    /// Each rank a block of rows.
    Rows,
    /// Each rank a block of the vocabulary's columns.
    Vocab,
}

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Logits: float32 or float16 [N, V] (or give the linear head: --hidden, --weight).
    #[arg(long)]
    pub logits: Option<PathBuf>,
    /// The linear head's hidden states h: float32 or float16 [N, D] (instead of --logits;
    /// the logits h Wᵀ + b are never stored).
    #[arg(long)]
    pub hidden: Option<PathBuf>,
    /// The linear head's weight W [V, D] (nn.Linear(D, V).weight), the type of --hidden.
    /// Not --weights, the class weights.
    #[arg(long)]
    pub weight: Option<PathBuf>,
    /// The linear head's bias b [V]: float32, or the type of --hidden.
    #[arg(long)]
    pub bias: Option<PathBuf>,
    /// Targets: int64 or int32 [N] class indices.
    #[arg(long)]
    pub targets: PathBuf,
    #[arg(long, value_enum, default_value = "ce")]
    pub loss_kind: LossKind,
    /// Class weights, float32 [V].
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Positive-class weights for bce, float32 [V].
    #[arg(long)]
    pub pos_weight: Option<PathBuf>,
    #[arg(long, default_value_t = xent::DEFAULT_IGNORE_INDEX, allow_hyphen_values = true)]
    pub ignore_index: i64,
    /// Label smoothing ε in [0, 1].
    #[arg(long, allow_negative_numbers = true)]
    pub label_smoothing: Option<f64>,
    #[arg(long, value_enum, default_value = "mean")]
    pub reduction: ReductionArg,
    /// z-loss scale s: each counted row adds s · lse².
    #[arg(long, allow_negative_numbers = true)]
    pub z_loss: Option<f64>,
    /// Logit softcap c: the loss sees c · tanh(x / c).
    #[arg(long, allow_negative_numbers = true)]
    pub softcap: Option<f64>,
    /// Multiplies the logits before anything else.
    #[arg(long, allow_negative_numbers = true)]
    pub logit_scale: Option<f64>,
    /// Replaces the `mean` denominator (gradient accumulation over micro-batches).
    #[arg(long, allow_negative_numbers = true)]
    pub n_items: Option<f64>,
    #[arg(long, value_enum, default_value = "gpu")]
    pub device: DeviceArg,
    /// Adapter name (substring, case-insensitive) for --device gpu; `all`: the rows shared
    /// by every adapter, one thread each, merged on the host.
    #[arg(long)]
    pub adapter: Option<String>,
    /// Shard the evaluation over the ranks of an MPI job (`mpirun -np P xent eval ...`;
    /// xent built with the `mpi` feature): `rows`, a block of rows a rank; `vocab`, a block
    /// of the vocabulary's columns a rank (the ranks exchange per-row partials only).
    /// Every rank maps the same files; rank 0 prints the JSON; output files are written by
    /// every rank into its part and renamed into place once every rank succeeded.
    #[arg(long, value_enum)]
    pub parallel: Option<ParallelArg>,
    /// With --parallel: the longest a rank waits for the others at an exchange before it
    /// ends the whole job (seconds).
    #[arg(long, default_value_t = 600.0, requires = "parallel")]
    pub rank_timeout: f64,
    /// Write the loss: 0-d float32, or float32 [N] for --reduction none.
    #[arg(long)]
    pub out_loss: Option<PathBuf>,
    /// Write d(loss)/d(logits) as float32 [N, V].
    #[arg(long)]
    pub out_grad: Option<PathBuf>,
    /// Linear head: write d(loss)/dh as float32 [N, D].
    #[arg(long)]
    pub out_grad_hidden: Option<PathBuf>,
    /// Linear head: write d(loss)/dW as float32 [V, D].
    #[arg(long)]
    pub out_grad_weight: Option<PathBuf>,
    /// Linear head: write d(loss)/db as float32 [V] (needs --bias).
    #[arg(long)]
    pub out_grad_bias: Option<PathBuf>,
    /// Compute the evaluation metrics in the same pass (accuracy, top-k, nll, perplexity,
    /// entropy, ECE): the JSON gains "metrics".
    #[arg(long)]
    pub metrics: bool,
    /// The k of the top-k accuracies (with --metrics).
    #[arg(long, value_delimiter = ',', default_value = "1,5", requires = "metrics")]
    pub top_k: Vec<usize>,
    /// Equal-width confidence bins of the ECE (with --metrics).
    #[arg(long, default_value_t = xent::metrics::DEFAULT_ECE_BINS, requires = "metrics")]
    pub ece_bins: usize,
    /// Write each row's predicted class as int64 [N] (with --metrics; −1 for a NaN row).
    #[arg(long, requires = "metrics")]
    pub out_pred: Option<PathBuf>,
    /// Draw a reliability diagram (accuracy against confidence per bin, with the bin
    /// counts) and a histogram of the row losses as an SVG picture (with --metrics).
    #[arg(long, requires = "metrics")]
    pub plot: Option<PathBuf>,
}

impl EvalArgs {
    /// The output files asked for, of either input kind.
    pub fn outputs(&self) -> impl Iterator<Item = &PathBuf> {
        [
            &self.out_loss,
            &self.out_grad,
            &self.out_grad_hidden,
            &self.out_grad_weight,
            &self.out_grad_bias,
            &self.out_pred,
            &self.plot,
        ]
        .into_iter()
        .flatten()
    }
}

/// Checks that `eval` was given one input kind, logits or a linear head, and only the
/// options of that kind.
fn check_input_kind(args: &EvalArgs) -> xent::Result<()> {
    let usage = |m: &str| Err(Error::InvalidOption(m.into()));
    match (&args.logits, &args.hidden) {
        (Some(_), Some(_)) => {
            return usage(
                "--logits and --hidden exclude each other: give the logits [N, V], or the linear \
                 head's --hidden [N, D] and --weight [V, D]",
            );
        }
        (None, None) => {
            return usage("give --logits [N, V], or the linear head's --hidden [N, D] and --weight [V, D]");
        }
        (Some(_), None) => {
            let head_only = [
                ("--weight", args.weight.is_some()),
                ("--bias", args.bias.is_some()),
                ("--out-grad-hidden", args.out_grad_hidden.is_some()),
                ("--out-grad-weight", args.out_grad_weight.is_some()),
                ("--out-grad-bias", args.out_grad_bias.is_some()),
            ];
            if let Some((flag, _)) = head_only.iter().find(|(_, given)| *given) {
                return Err(Error::InvalidOption(format!(
                    "{flag} belongs to the linear head (--hidden), not to --logits{}",
                    if *flag == "--weight" { " (class weights are --weights)" } else { "" }
                )));
            }
        }
        (None, Some(_)) => {
            if args.weight.is_none() {
                return usage("--hidden needs the linear head's --weight [V, D]");
            }
            if args.out_grad.is_some() {
                return usage(
                    "--out-grad is d(loss)/d(logits), which the linear head never stores: use \
                     --out-grad-hidden, --out-grad-weight, --out-grad-bias",
                );
            }
            if args.loss_kind != LossKind::Ce {
                return usage("the linear head (--hidden) takes class-index targets: --loss-kind ce only");
            }
            if args.out_grad_bias.is_some() && args.bias.is_none() {
                return usage("--out-grad-bias needs --bias");
            }
        }
    }
    Ok(())
}

/// Checks `eval`'s options and builds the loss options, before any file is touched.
pub fn eval_options(args: &EvalArgs) -> xent::Result<LossOptions> {
    check_input_kind(args)?;
    if args.pos_weight.is_some() && args.loss_kind != LossKind::Bce {
        return Err(Error::InvalidOption("--pos-weight applies to --loss-kind bce only".into()));
    }
    if args.adapter.is_some() && args.device != DeviceArg::Gpu {
        return Err(Error::InvalidOption("--adapter only applies to --device gpu".into()));
    }
    let reduction = match args.reduction {
        ReductionArg::Mean => Reduction::Mean,
        ReductionArg::Sum => Reduction::Sum,
        ReductionArg::None => Reduction::None,
    };
    let mut opts = LossOptions::new().reduction(reduction).ignore_index(args.ignore_index);
    if let Some(e) = args.label_smoothing {
        opts = opts.label_smoothing(e);
    }
    if let Some(s) = args.z_loss {
        opts = opts.z_loss(s);
    }
    if let Some(c) = args.softcap {
        opts = opts.softcap(c);
    }
    if let Some(a) = args.logit_scale {
        opts = opts.logit_scale(a);
    }
    if let Some(n) = args.n_items {
        opts = opts.n_items(n);
    }
    if args.metrics {
        if args.loss_kind == LossKind::Bce {
            return Err(Error::InvalidOption(
                "--metrics needs one class per row (class indices or probabilities), not --loss-kind bce"
                    .into(),
            ));
        }
        let spec = xent::MetricsSpec::new()
            .top_k(&args.top_k)
            .ece_bins(args.ece_bins)
            .per_row(args.out_pred.is_some() || args.plot.is_some());
        opts = opts.metrics(spec);
    }
    // Every scalar option is checked here, before any file is read; the class weights
    // (read from --weights later) are checked against V when the logits are known.
    opts.validate(usize::MAX)?;
    Ok(opts)
}
