//! The CPU paths: [`reference`], plain f64 code that every GPU result is checked against.

pub mod reference;
