//! The CPU paths: [`reference`](mod@reference), plain f64 code that every other result is checked
//! against, and [`fast`], the fused multi-threaded path that GPU numbers are compared
//! with.

pub mod fast;
pub mod reference;
