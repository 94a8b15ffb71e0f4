//! Any bytes given to the `.npy` reader: a typed error or an array that agrees with its
//! header, never a panic, an abort on a huge allocation, or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xent::npy::{self, NpyData};

fuzz_target!(|data: &[u8]| {
    if let Ok(array) = npy::parse(std::path::Path::new("fuzz.npy"), data) {
        let count: usize = array.shape.iter().product();
        let len = match &array.data {
            NpyData::F16(v) => v.len(),
            NpyData::F32(v) => v.len(),
            NpyData::F64(v) => v.len(),
            NpyData::I32(v) => v.len(),
            NpyData::I64(v) => v.len(),
        };
        assert_eq!(count, len, "shape and data disagree");
    }
});
