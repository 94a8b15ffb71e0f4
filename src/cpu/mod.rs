//! The CPU paths: `reference`, plain f64 code that every other result is checked against
//! ([`crate::Reference`]), and `fast`, the fused multi-threaded path that GPU numbers are
//! compared with ([`crate::CpuFast`]). Both are reached through
//! [`crate::Backend::evaluate`].

pub(crate) mod fast;
mod fast_cells;
pub(crate) mod fast_linear;
pub(crate) mod fast_vocab;
pub(crate) mod reference;
mod reference_linear;
