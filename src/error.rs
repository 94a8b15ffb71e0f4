//! The one error type shared by the GPU and CPU paths, the `.npy` reader and the CLI.

use std::path::PathBuf;

/// Everything that can go wrong in xent, each with a message that says what and where.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A buffer's length does not match the shape it was given.
    #[error("shape mismatch: {what} has {got} elements, expected {expected}")]
    Shape {
        /// Which input is wrong ("logits", "targets", ...).
        what: String,
        /// The length that was passed.
        got: usize,
        /// The length that the other inputs imply.
        expected: usize,
    },

    /// A class-index target outside `[0, classes)` that is not `ignore_index`.
    #[error(
        "target out of range at row {row}: {value} is not a class in [0, {classes}) and not ignore_index ({ignore_index})"
    )]
    TargetOutOfRange {
        /// The row of the bad target.
        row: usize,
        /// The bad target value.
        value: i64,
        /// The number of classes (valid targets are `0..classes`).
        classes: usize,
        /// The ignore index in force.
        ignore_index: i64,
    },

    /// An option value that makes no sense (label smoothing outside [0, 1], ...).
    #[error("invalid option: {0}")]
    InvalidOption(String),

    /// A combination of inputs and outputs this path does not compute (see the support
    /// matrix in README): never a silent fallback to another path.
    #[error("unsupported on {path}: {cell} ({why})")]
    Unsupported {
        /// The path ("gpu: llvmpipe (Vulkan)", "device-resident", ...).
        path: String,
        /// The combination, as [`crate::Cell`] prints it.
        cell: String,
        /// Why, and what to do instead.
        why: String,
    },

    /// A problem too large for this path (a single binding or buffer limit).
    #[error("too large: {what} needs {needed} bytes, but the limit is {limit} bytes ({hint})")]
    TooLarge {
        /// What does not fit.
        what: String,
        /// Bytes needed.
        needed: u64,
        /// The adapter's limit in bytes.
        limit: u64,
        /// Which limit, and what to do about it.
        hint: String,
    },

    /// No GPU adapter could be found.
    #[error(
        "no GPU adapter found{detail}. On a headless Linux machine install Mesa's software Vulkan driver \
         (lavapipe): `apt-get install mesa-vulkan-drivers`; or use the CPU path (`--device cpu`)"
    )]
    NoAdapter {
        /// Extra context, e.g. the adapter name that was asked for.
        detail: String,
    },

    /// The GPU device was lost (driver reset, device destroyed, ...). Build a new context.
    #[error("GPU device lost: {0}; create a new context to continue")]
    DeviceLost(String),

    /// The GPU ran out of memory.
    #[error("GPU out of memory: {0}")]
    OutOfMemory(String),

    /// Waiting for the GPU timed out.
    #[error("GPU did not finish within {0:?}")]
    Timeout(std::time::Duration),

    /// Any other error reported by wgpu (validation, internal).
    #[error("GPU error: {0}")]
    Gpu(String),

    /// A `.npy` file that cannot be used.
    #[error("{path}: {message}")]
    Npy {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// Another rank of a collective evaluation failed; every rank returns this, so that
    /// all exit together ([`crate::collective`]).
    #[error("rank {rank} failed: {message}")]
    Peer {
        /// The first failed rank.
        rank: usize,
        /// Whether that rank's error was bad input (the exit code follows it).
        bad_input: bool,
        /// Its error, as it printed.
        message: String,
    },

    /// A collective exchange that could not complete: a rank that never arrived within
    /// the bounded wait, or left the group.
    #[error("collective: {0}")]
    Collective(String),

    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl Error {
    /// True for errors caused by the caller's input or options (the CLI exits with 2 for these).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            Error::Shape { .. }
                | Error::TargetOutOfRange { .. }
                | Error::InvalidOption(_)
                | Error::Npy { .. }
                | Error::Io { .. }
                | Error::Peer { bad_input: true, .. }
        )
    }
}

/// Result with xent's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
