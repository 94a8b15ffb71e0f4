//! A small, strict reader and writer for NumPy's `.npy` format (versions 1–3), enough
//! for logits, targets and results: little-endian `f2`, `f4`, `f8`, `i4`, `i8`, in C or
//! Fortran order. Everything else is refused with a message naming the file and what is
//! wrong.
//!
//! # Fortran order
//!
//! Callers always see C order (row-major: element `(r, c)` of shape `[N, V]` at
//! `r * V + c`). A Fortran-order (column-major) file, as scikit-learn and
//! `np.asfortranarray` write them (header `'fortran_order': True`, element `(r, c)` at
//! `c * N + r`), is **transposed into memory** when read: [`read`] returns the row-major
//! vector, and [`MappedNpy::open`] fills one owned row-major buffer by a cache-blocked
//! transpose (64×64 tiles, bands of rows in parallel) straight from the mapped file. So
//! such a file costs one buffer of its data's size in RAM (N×V elements for logits) and
//! a pass over it when opened, where a C-order file is mapped and used in place. Arrays
//! with at most one dimension longer than 1 (0-D, 1-D, `[N, 1]`, `[1, V]`) and empty ones
//! are laid out identically in both orders: they are used as they are, still mapped.
//! Arrays of three or more dimensions are transposed in general (Fortran order of
//! `[d0, …, dk]` is C order of `[dk, …, d0]`: every axis is reversed).

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The element type of an array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    /// `<f2` (IEEE binary16)
    F16,
    /// `<f4`
    F32,
    /// `<f8`
    F64,
    /// `<i4`
    I32,
    /// `<i8`
    I64,
}

impl DType {
    fn size(self) -> usize {
        match self {
            DType::F16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
        }
    }
}

/// An array read from a `.npy` file.
#[derive(Clone, Debug, PartialEq)]
pub enum NpyData {
    /// float16 values, as raw bits.
    F16(Vec<u16>),
    /// float32 values.
    F32(Vec<f32>),
    /// float64 values.
    F64(Vec<f64>),
    /// int32 values.
    I32(Vec<i32>),
    /// int64 values.
    I64(Vec<i64>),
}

/// A `.npy` array: shape and data.
#[derive(Clone, Debug, PartialEq)]
pub struct NpyArray {
    /// The shape (empty for a 0-d array).
    pub shape: Vec<usize>,
    /// The elements, in C order.
    pub data: NpyData,
}

fn bad(path: &Path, message: impl Into<String>) -> Error {
    Error::Npy { path: path.to_path_buf(), message: message.into() }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// The parsed header of a `.npy` file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// Whether the data is in Fortran (column-major) order. [`read_header`] reports what
    /// the file says; [`MappedNpy::header`] describes the data it hands out, which is
    /// always in C order, so it is `false` there.
    pub fortran_order: bool,
    /// Byte offset of the data in the file.
    pub data_offset: usize,
}

impl Header {
    /// Whether the data must be transposed to be seen in C order: Fortran order with more
    /// than one dimension longer than 1 (otherwise both orders are the same layout).
    fn needs_transpose(&self) -> bool {
        self.fortran_order && !self.shape.contains(&0) && self.shape.iter().filter(|&&d| d > 1).count() > 1
    }
}

/// Reads and checks the header of `path`. Fortran-order files are accepted and reported
/// in [`Header::fortran_order`]; [`read`] and [`MappedNpy`] transpose their data.
pub fn read_header(path: &Path, file: &mut impl Read) -> Result<Header> {
    let mut pre = [0u8; 8];
    file.read_exact(&mut pre).map_err(|_| bad(path, "not a .npy file: shorter than the 8-byte preamble"))?;
    if &pre[..6] != b"\x93NUMPY" {
        return Err(bad(path, "not a .npy file: missing the \\x93NUMPY magic"));
    }
    let (len, pre_len) = match pre[6] {
        1 => {
            let mut b = [0u8; 2];
            file.read_exact(&mut b).map_err(|_| bad(path, "truncated header"))?;
            (u16::from_le_bytes(b) as usize, 10)
        }
        2 | 3 => {
            let mut b = [0u8; 4];
            file.read_exact(&mut b).map_err(|_| bad(path, "truncated header"))?;
            (u32::from_le_bytes(b) as usize, 12)
        }
        v => return Err(bad(path, format!("unsupported .npy version {v}"))),
    };
    if len > 1 << 20 {
        return Err(bad(path, format!("header length {len} is implausible")));
    }
    let mut text = vec![0u8; len];
    file.read_exact(&mut text).map_err(|_| bad(path, "truncated header"))?;
    let text = String::from_utf8(text).map_err(|_| bad(path, "header is not text"))?;
    let (dtype, fortran_order, shape) = parse_dict(&text).map_err(|m| bad(path, m))?;
    Ok(Header { dtype, shape, fortran_order, data_offset: pre_len + len })
}

/// Parses `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }`.
fn parse_dict(text: &str) -> std::result::Result<(DType, bool, Vec<usize>), String> {
    let field = |key: &str| -> std::result::Result<&str, String> {
        let at = text.find(&format!("'{key}'")).ok_or_else(|| format!("header has no '{key}'"))?;
        let rest = &text[at + key.len() + 2..];
        let rest = rest.trim_start();
        rest.strip_prefix(':').map(str::trim_start).ok_or_else(|| format!("malformed header near '{key}'"))
    };
    let descr = field("descr")?;
    let descr = descr.strip_prefix('\'').and_then(|d| d.split('\'').next()).ok_or("malformed 'descr'")?;
    let dtype = match descr {
        "<f2" => DType::F16,
        "<f4" => DType::F32,
        "<f8" => DType::F64,
        "<i4" => DType::I32,
        "<i8" => DType::I64,
        other => {
            return Err(format!(
                "unsupported dtype '{other}' (supported: little-endian float16, float32, float64, int32, int64)"
            ));
        }
    };
    let fortran = field("fortran_order")?;
    let fortran = if fortran.starts_with("True") {
        true
    } else if fortran.starts_with("False") {
        false
    } else {
        return Err("malformed 'fortran_order'".into());
    };
    let shape = field("shape")?;
    let shape = shape.strip_prefix('(').and_then(|s| s.split(')').next()).ok_or("malformed 'shape'")?;
    let dims = shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.trim_end_matches('L').parse::<usize>().map_err(|_| format!("bad dimension '{s}' in shape"))
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok((dtype, fortran, dims))
}

/// A `.npy` file mapped into memory: its data is used in place, never copied, so a file
/// larger than half the machine's memory still works.
///
/// The exception is a Fortran-order file with more than one dimension longer than 1: its
/// data is transposed into one owned row-major buffer when opened (see the
/// [module docs](self#fortran-order)), so it costs its data's size in RAM. Either way the
/// accessors hand out the data in C order and [`MappedNpy::header`] describes it so.
pub struct MappedNpy {
    path: PathBuf,
    header: Header,
    data: Backing,
}

/// Where the data of a [`MappedNpy`] lives.
enum Backing {
    /// The file, mapped; the data starts at the header's `data_offset`.
    Mapped(memmap2::Mmap),
    /// A Fortran-order file's data, transposed into C order.
    Owned(NpyData),
}

impl MappedNpy {
    /// Maps `path` read-only after checking its header and length. A Fortran-order file
    /// is transposed into memory from the map, which is then dropped.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mut file = File::open(path).map_err(io(path))?;
        let len = file.metadata().map_err(io(path))?.len();
        let (mut header, count) = checked_header(path, &mut file, len)?;
        // SAFETY: the map is read-only; like every reader of a file, we rely on no other
        // process truncating it while it is in use.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io(path))?;
        let data = match header.needs_transpose() {
            true => Backing::Owned(transposed(path, &header, count, &map[header.data_offset..])?),
            false => Backing::Mapped(map),
        };
        // The data handed out is in C order either way.
        header.fortran_order = false;
        Ok(Self { path: path.to_path_buf(), header, data })
    }

    /// The header (dtype and shape), describing the data as handed out: C order.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// True when the data is used in place from the mapped file; false for a Fortran-order
    /// file transposed into memory.
    pub fn is_mapped(&self) -> bool {
        matches!(self.data, Backing::Mapped(_))
    }

    /// The data as raw float16 bits, in place (or transposed, for Fortran order). Fails
    /// unless the dtype is float16.
    pub fn as_f16_bits(&self) -> Result<&[u16]> {
        match &self.data {
            Backing::Owned(NpyData::F16(v)) => Ok(v),
            Backing::Mapped(map) if self.header.dtype == DType::F16 => {
                bytemuck::try_cast_slice(&map[self.header.data_offset..])
                    .map_err(|e| bad(&self.path, format!("data is not 2-byte aligned in the file: {e}")))
            }
            _ => Err(bad(&self.path, format!("expected float16 data, found {:?}", self.header.dtype))),
        }
    }

    /// The data as f32, in place (or transposed, for Fortran order). Fails unless the
    /// dtype is float32.
    pub fn as_f32(&self) -> Result<&[f32]> {
        match &self.data {
            Backing::Owned(NpyData::F32(v)) => Ok(v),
            Backing::Mapped(map) if self.header.dtype == DType::F32 => {
                bytemuck::try_cast_slice(&map[self.header.data_offset..])
                    .map_err(|e| bad(&self.path, format!("data is not 4-byte aligned in the file: {e}")))
            }
            _ => Err(bad(&self.path, format!("expected float32 data, found {:?}", self.header.dtype))),
        }
    }
}

/// A float32 `.npy` output written through a memory map: created under a temporary name
/// beside `path`, renamed into place by [`NpyWriter::commit`], and removed if dropped
/// before that, so no half-written file is ever left at `path`.
pub struct NpyWriter {
    path: PathBuf,
    tmp: PathBuf,
    offset: usize,
    map: Option<memmap2::MmapMut>,
    /// Whether this writer created the temporary file (and renames or removes it); the
    /// writers that [`join`](Self::join) it write their part only.
    owner: bool,
}

/// The temporary files of this process's live [`NpyWriter`]s that it created: what
/// [`remove_live_temps`] removes when the process must end at once (an MPI abort runs no
/// destructor).
static LIVE_TEMPS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Removes the temporary files of every live writer this process created, for a process
/// about to end without unwinding (`xent eval --parallel`'s abort paths); the writers'
/// own drops would do it otherwise.
pub fn remove_live_temps() {
    let live = LIVE_TEMPS.lock().unwrap_or_else(|p| p.into_inner());
    for p in live.iter() {
        let _ = std::fs::remove_file(p);
    }
}

impl NpyWriter {
    /// Creates the temporary file with `shape` and maps its data for writing.
    pub fn create(path: impl AsRef<Path>, shape: &[usize]) -> Result<Self> {
        let path = path.as_ref();
        let tmp = temp_path(path);
        let header = header_bytes("<f4", shape);
        let count: usize = shape.iter().product();
        let mut writer =
            Self { path: path.to_path_buf(), tmp: tmp.clone(), offset: header.len(), map: None, owner: true };
        let err = |source| Error::Io { path: path.to_path_buf(), source };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(err)?;
        file.set_len((header.len() + count * 4) as u64).map_err(err)?;
        // SAFETY: the file was just created by us under a private temporary name.
        let mut map = unsafe { memmap2::MmapMut::map_mut(&file) }.map_err(err)?;
        map[..header.len()].copy_from_slice(&header);
        writer.map = Some(map);
        LIVE_TEMPS.lock().unwrap_or_else(|p| p.into_inner()).push(tmp);
        Ok(writer)
    }

    /// Joins the temporary file of `path` that the process `creator` is writing with
    /// [`create`](Self::create) (the same `shape`), to fill a part of it: the ranks of a
    /// sharded evaluation on one file system. [`commit`](Self::commit) then only flushes
    /// this part; the creator renames the file once every part is in.
    pub fn join(path: impl AsRef<Path>, creator: u32, shape: &[usize]) -> Result<Self> {
        let path = path.as_ref();
        let tmp = temp_path_of(path, creator);
        let header = header_bytes("<f4", shape);
        let count: usize = shape.iter().product();
        let err = |source| Error::Io { path: tmp.clone(), source };
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&tmp).map_err(err)?;
        let len = file.metadata().map_err(err)?.len();
        if len != (header.len() + count * 4) as u64 {
            return Err(bad(
                &tmp,
                format!("is {len} bytes, not the {} of shape {shape:?}", header.len() + count * 4),
            ));
        }
        // SAFETY: the creator made the file for this job; each writer fills its own part.
        let map = unsafe { memmap2::MmapMut::map_mut(&file) }.map_err(err)?;
        // On the live list too: a rank that must end the job at once removes the file it
        // joined, whose creator may be the rank that is stuck.
        LIVE_TEMPS.lock().unwrap_or_else(|p| p.into_inner()).push(tmp.clone());
        Ok(Self { path: path.to_path_buf(), tmp, offset: header.len(), map: Some(map), owner: false })
    }

    /// The data to fill, as f32.
    pub fn data_mut(&mut self) -> &mut [f32] {
        let offset = self.offset;
        let map = self.map.as_mut().expect("mapped until commit");
        bytemuck::cast_slice_mut(&mut map[offset..])
    }

    /// Flushes the data and renames the file into place (a joined writer: flushes only).
    pub fn commit(mut self) -> Result<()> {
        let map = self.map.take().expect("mapped until commit");
        self.forget();
        let flushed = map.flush();
        drop(map);
        let done =
            flushed.and_then(|_| if self.owner { std::fs::rename(&self.tmp, &self.path) } else { Ok(()) });
        if done.is_err() && self.owner {
            let _ = std::fs::remove_file(&self.tmp);
        }
        done.map_err(|source| Error::Io { path: self.path.clone(), source })
    }
}

impl NpyWriter {
    /// Takes this writer's temporary file off the live list.
    fn forget(&self) {
        LIVE_TEMPS.lock().unwrap_or_else(|p| p.into_inner()).retain(|p| p != &self.tmp);
    }
}

impl Drop for NpyWriter {
    fn drop(&mut self) {
        // Not committed: off the live list, and the creator removes the file.
        if self.map.take().is_some() {
            self.forget();
            if self.owner {
                let _ = std::fs::remove_file(&self.tmp);
            }
        }
    }
}

fn element_count(path: &Path, header: &Header) -> Result<usize> {
    header.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| bad(path, "shape overflows"))
}

fn check_length(path: &Path, header: &Header, count: usize, file_len: u64) -> Result<()> {
    let needed = (count as u64)
        .checked_mul(header.dtype.size() as u64)
        .ok_or_else(|| bad(path, format!("shape {:?} is too large", header.shape)))?;
    let available = file_len.saturating_sub(header.data_offset as u64);
    if available != needed {
        return Err(bad(
            path,
            format!(
                "data is {available} bytes but shape {:?} of {:?} needs {needed} (truncated or corrupt file)",
                header.shape, header.dtype
            ),
        ));
    }
    Ok(())
}

/// Reads the header of `path` from `reader` and checks it against `total_len`, the
/// length of the whole file; returns it with the element count.
fn checked_header(path: &Path, reader: &mut impl Read, total_len: u64) -> Result<(Header, usize)> {
    let header = read_header(path, reader)?;
    let count = element_count(path, &header)?;
    check_length(path, &header, count, total_len)?;
    Ok((header, count))
}

/// Reads a whole `.npy` file (the data is read straight into the typed vector: one copy).
/// A Fortran-order file is transposed into the vector from a map of the file instead, so
/// the data is in C order either way.
pub fn read(path: impl AsRef<Path>) -> Result<NpyArray> {
    let path = path.as_ref();
    let mut file = File::open(path).map_err(io(path))?;
    let len = file.metadata().map_err(io(path))?.len();
    let (header, count) = checked_header(path, &mut file, len)?;
    let data = match header.needs_transpose() {
        true => {
            // SAFETY: as in `MappedNpy::open`.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io(path))?;
            transposed(path, &header, count, &map[header.data_offset..])?
        }
        false => read_data(path, &mut file, header.dtype, count)?,
    };
    Ok(NpyArray { shape: header.shape, data })
}

/// Parses a whole `.npy` image held in memory (`path` only names it in messages). The
/// data is in C order, Fortran-order images being transposed.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<NpyArray> {
    let mut reader = bytes;
    let (header, count) = checked_header(path, &mut reader, bytes.len() as u64)?;
    let data = match header.needs_transpose() {
        true => transposed(path, &header, count, &bytes[header.data_offset..])?,
        false => read_data(path, &mut reader, header.dtype, count)?,
    };
    Ok(NpyArray { shape: header.shape, data })
}

/// Reads `count` elements of `dtype` from `reader`, in the file's order.
fn read_data(path: &Path, reader: &mut impl Read, dtype: DType, count: usize) -> Result<NpyData> {
    fn fill<T: bytemuck::Pod + Default>(path: &Path, reader: &mut impl Read, count: usize) -> Result<Vec<T>> {
        let mut v = vec![T::default(); count];
        reader.read_exact(bytemuck::cast_slice_mut(&mut v)).map_err(io(path))?;
        Ok(v)
    }
    Ok(match dtype {
        DType::F16 => NpyData::F16(fill(path, reader, count)?),
        DType::F32 => NpyData::F32(fill(path, reader, count)?),
        DType::F64 => NpyData::F64(fill(path, reader, count)?),
        DType::I32 => NpyData::I32(fill(path, reader, count)?),
        DType::I64 => NpyData::I64(fill(path, reader, count)?),
    })
}

/// The side of the square tiles of the blocked transpose: 64×64 elements of 8 bytes are
/// 32 KiB, read and written, which stay in L1/L2 while a tile is copied.
const TILE: usize = 64;

/// The Fortran-order data `src` (exactly `count` elements of `header.dtype`, at any
/// alignment) transposed into a new vector in C order.
fn transposed(path: &Path, header: &Header, count: usize, src: &[u8]) -> Result<NpyData> {
    fn go<T: bytemuck::Pod>(path: &Path, shape: &[usize], count: usize, src: &[u8]) -> Result<Vec<T>> {
        let size = std::mem::size_of::<T>();
        debug_assert_eq!(src.len(), count * size);
        // A probe for the typed error (the allocation itself would abort), then the
        // buffer from the zeroing allocator: its pages are zeroed lazily, as the transpose
        // first writes them on every core, instead of by one pass here.
        Vec::<T>::new().try_reserve_exact(count).map_err(|_| {
            bad(
                path,
                format!(
                    "Fortran-order data is transposed into memory, but a buffer of {} bytes \
                     for shape {shape:?} could not be allocated (save with \
                     np.ascontiguousarray to have it mapped instead)",
                    count * size
                ),
            )
        })?;
        let mut v = vec![T::zeroed(); count];
        let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut v);
        // The elements are moved as byte arrays: the mapped source need not be aligned.
        match size {
            2 => fortran_to_c::<[u8; 2]>(bytemuck::cast_slice(src), shape, bytemuck::cast_slice_mut(dst)),
            4 => fortran_to_c::<[u8; 4]>(bytemuck::cast_slice(src), shape, bytemuck::cast_slice_mut(dst)),
            8 => fortran_to_c::<[u8; 8]>(bytemuck::cast_slice(src), shape, bytemuck::cast_slice_mut(dst)),
            _ => unreachable!("element sizes are 2, 4 or 8 bytes"),
        }
        Ok(v)
    }
    let shape = &header.shape[..];
    Ok(match header.dtype {
        DType::F16 => NpyData::F16(go(path, shape, count, src)?),
        DType::F32 => NpyData::F32(go(path, shape, count, src)?),
        DType::F64 => NpyData::F64(go(path, shape, count, src)?),
        DType::I32 => NpyData::I32(go(path, shape, count, src)?),
        DType::I64 => NpyData::I64(go(path, shape, count, src)?),
    })
}

/// Copies the array of `shape` (rank 2 or more) from Fortran order in `src` to C order in
/// `dst`. Fortran order of `[d0, …, dk]` is C order of `[dk, …, d0]`, so every axis is
/// reversed: for each index of the middle axes, the `d0 × dk` matrix of the first and
/// last axes (element `(r, c)` at `r + c * d0⋯d(k-1)` in `src`, at `r * d1⋯dk + c` in
/// `dst`) is copied in [`TILE`]×[`TILE`] tiles, one band of `TILE` rows per rayon task.
fn fortran_to_c<T: Copy + Send + Sync>(src: &[T], shape: &[usize], dst: &mut [T]) {
    use rayon::prelude::*;
    assert!(shape.len() >= 2 && src.len() == dst.len() && dst.len() == shape.iter().product::<usize>());
    if dst.is_empty() {
        return;
    }
    let k = shape.len() - 1;
    // The step of each axis in `src` (the product of the axes before it) and `dst` (after).
    let src_step: Vec<usize> = (0..=k).map(|j| shape[..j].iter().product()).collect();
    let dst_step: Vec<usize> = (0..=k).map(|j| shape[j + 1..].iter().product()).collect();
    let (rows, cols, col_step, row_step) = (shape[0], shape[k], src_step[k], dst_step[0]);
    let middles: usize = shape[1..k].iter().product();
    dst.par_chunks_mut(TILE * row_step).enumerate().for_each(|(band, out)| {
        let r0 = band * TILE;
        let r1 = (r0 + TILE).min(rows);
        for m in 0..middles {
            // The offsets of middle index `m` (its axes in C order, the last varying fastest).
            let (mut rest, mut from, mut to) = (m, 0, 0);
            for j in (1..k).rev() {
                let i = rest % shape[j];
                rest /= shape[j];
                from += i * src_step[j];
                to += i * dst_step[j];
            }
            for c0 in (0..cols).step_by(TILE) {
                let c1 = (c0 + TILE).min(cols);
                for r in r0..r1 {
                    let row = &mut out[(r - r0) * row_step + to + c0..][..c1 - c0];
                    for (x, c) in row.iter_mut().zip(c0..c1) {
                        *x = src[from + r + c * col_step];
                    }
                }
            }
        }
    });
}

fn header_bytes(descr: &str, shape: &[usize]) -> Vec<u8> {
    let dims = match shape {
        [] => String::new(),
        [d] => format!("{d},"),
        ds => ds.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "),
    };
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({dims}), }}");
    // Pad with spaces so that the data starts on a 64-byte boundary; end with a newline.
    let total = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat(total.next_multiple_of(64) - total));
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}

/// Writes float32 `data` with `shape` to `path` atomically: a temporary file beside it is
/// renamed into place only when complete, so no half-written file is ever left.
pub fn write_f32(path: impl AsRef<Path>, shape: &[usize], data: &[f32]) -> Result<()> {
    let path = path.as_ref();
    assert_eq!(shape.iter().product::<usize>(), data.len(), "shape and data disagree");
    let tmp = temp_path(path);
    let result = (|| -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(File::create(&tmp)?);
        f.write_all(&header_bytes("<f4", shape))?;
        f.write_all(bytemuck::cast_slice(data))?;
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(source) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::Io { path: path.to_path_buf(), source });
    }
    Ok(())
}

/// Writes int64 `data` (1-D) to `path` atomically.
pub fn write_i64(path: impl AsRef<Path>, data: &[i64]) -> Result<()> {
    let path = path.as_ref();
    let tmp = temp_path(path);
    let result = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(&header_bytes("<i8", &[data.len()]))?;
        f.write_all(bytemuck::cast_slice(data))?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        Error::Io { path: path.to_path_buf(), source }
    })
}

/// The temporary name used while writing `path`.
pub fn temp_path(path: &Path) -> PathBuf {
    temp_path_of(path, std::process::id())
}

/// The temporary name the process `pid` uses while writing `path`.
pub fn temp_path_of(path: &Path, pid: u32) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".xent-tmp-{pid}"));
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let dir = std::env::temp_dir().join(format!("xent-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.npy");
        write_f32(&p, &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.5]).unwrap();
        let a = read(&p).unwrap();
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.data, NpyData::F32(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.5]));
        write_f32(&p, &[], &[7.0]).unwrap();
        assert_eq!(read(&p).unwrap().shape, Vec::<usize>::new());
        let q = dir.join("t.npy");
        write_i64(&q, &[3, -100]).unwrap();
        assert_eq!(read(&q).unwrap().data, NpyData::I64(vec![3, -100]));

        // Truncated data.
        let bytes = std::fs::read(&q).unwrap();
        std::fs::write(&q, &bytes[..bytes.len() - 3]).unwrap();
        let e = read(&q).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        // Garbage.
        std::fs::write(&q, b"hello world, not numpy").unwrap();
        assert!(read(&q).unwrap_err().to_string().contains("magic"));
        // Fortran order, 2-D: accepted now, and seen transposed.
        let mut h = header_bytes("<f4", &[2, 2]);
        let at = h.windows(5).position(|w| w == b"False").unwrap();
        h.splice(at..at + 5, b"True ".iter().copied());
        h.extend_from_slice(bytemuck::cast_slice(&[1f32, 3.0, 2.0, 4.0]));
        std::fs::write(&q, &h).unwrap();
        assert_eq!(read(&q).unwrap().data, NpyData::F32(vec![1.0, 2.0, 3.0, 4.0]));
        // Mapped reading and writing.
        let m = dir.join("m.npy");
        let mut w = NpyWriter::create(&m, &[2, 2]).unwrap();
        w.data_mut().copy_from_slice(&[1.0, 2.0, 3.0, 4.0]);
        assert!(!m.exists(), "not visible before commit");
        w.commit().unwrap();
        let mapped = MappedNpy::open(&m).unwrap();
        assert_eq!(mapped.header().shape, vec![2, 2]);
        assert_eq!(mapped.as_f32().unwrap(), &[1.0, 2.0, 3.0, 4.0]);
        let dropped = dir.join("dropped.npy");
        drop(NpyWriter::create(&dropped, &[3]).unwrap());
        assert!(
            std::fs::read_dir(&dir).unwrap().all(|e| !e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("dropped"))
        );
        // Missing file names its path.
        let e = read(dir.join("missing.npy")).unwrap_err().to_string();
        assert!(e.contains("missing.npy"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A `.npy` image as NumPy writes it with `fortran_order` True: magic, version 1.0,
    /// the header dict padded with spaces to a multiple of 64 bytes (newline included).
    fn fortran_image(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
        let dims = match shape {
            [] => String::new(),
            [d] => format!("{d},"),
            ds => ds.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "),
        };
        let dict = format!("{{'descr': '{descr}', 'fortran_order': True, 'shape': ({dims}), }}");
        let pad = (64 - (10 + dict.len() + 1) % 64) % 64;
        let header = format!("{dict}{}\n", " ".repeat(pad));
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        assert_eq!(out.len() % 64, 0);
        out.extend_from_slice(data);
        out
    }

    /// The elements of a `shape` array in Fortran order, element (r, c) being `f(r, c)`.
    fn column_major<T>(rows: usize, cols: usize, f: impl Fn(usize, usize) -> T) -> Vec<T> {
        (0..cols).flat_map(|c| (0..rows).map(move |r| (r, c))).map(|(r, c)| f(r, c)).collect()
    }

    fn row_major<T>(rows: usize, cols: usize, f: impl Fn(usize, usize) -> T) -> Vec<T> {
        (0..rows).flat_map(|r| (0..cols).map(move |c| (r, c))).map(|(r, c)| f(r, c)).collect()
    }

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(name: &str) -> Self {
            let d = std::env::temp_dir().join(format!("xent-npy-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&d).unwrap();
            TempDir(d)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn npy_fortran_f32_is_read_row_major() {
        let dir = TempDir::new("fortran-f32");
        let p = dir.0.join("f.npy");
        let value = |r: usize, c: usize| (r * 10 + c) as f32;
        let data = column_major(3, 5, value);
        std::fs::write(&p, fortran_image("<f4", &[3, 5], bytemuck::cast_slice(&data))).unwrap();
        let want = row_major(3, 5, value);
        let header = read_header(&p, &mut File::open(&p).unwrap()).unwrap();
        assert!(header.fortran_order);
        assert_eq!(header.shape, vec![3, 5]);
        let a = read(&p).unwrap();
        assert_eq!(a.shape, vec![3, 5]);
        assert_eq!(a.data, NpyData::F32(want.clone()));
        assert_eq!(parse(&p, &std::fs::read(&p).unwrap()).unwrap(), a);
        let m = MappedNpy::open(&p).unwrap();
        assert_eq!(m.header().shape, vec![3, 5]);
        assert!(!m.header().fortran_order, "handed out in C order");
        assert!(!m.is_mapped());
        assert_eq!(m.as_f32().unwrap(), &want[..]);
        let e = m.as_f16_bits().unwrap_err().to_string();
        assert!(e.contains("expected float16") && e.contains("f.npy"), "{e}");
    }

    #[test]
    fn npy_fortran_i64_1d_is_c_order_and_stays_mapped() {
        let dir = TempDir::new("fortran-i64");
        let p = dir.0.join("t.npy");
        let data = [4i64, -100, 0, 7];
        std::fs::write(&p, fortran_image("<i8", &[4], bytemuck::cast_slice(&data))).unwrap();
        assert_eq!(read(&p).unwrap(), NpyArray { shape: vec![4], data: NpyData::I64(data.to_vec()) });
        let m = MappedNpy::open(&p).unwrap();
        assert!(m.is_mapped());
        assert_eq!(m.header().shape, vec![4]);
        assert!(m.as_f32().unwrap_err().to_string().contains("expected float32"));
        // 0-D, [N, 1] and [1, V] are the same layout in both orders too.
        for shape in [&[][..], &[1, 6], &[6, 1], &[1, 6, 1]] {
            let count: usize = shape.iter().product();
            let v: Vec<f32> = (0..count).map(|i| i as f32).collect();
            std::fs::write(&p, fortran_image("<f4", shape, bytemuck::cast_slice(&v))).unwrap();
            let m = MappedNpy::open(&p).unwrap();
            assert!(m.is_mapped(), "{shape:?}");
            assert_eq!(m.as_f32().unwrap(), &v[..], "{shape:?}");
            assert_eq!(read(&p).unwrap().data, NpyData::F32(v), "{shape:?}");
        }
        // Empty arrays read as empty in either order.
        std::fs::write(&p, fortran_image("<f4", &[0, 5], &[])).unwrap();
        assert_eq!(read(&p).unwrap(), NpyArray { shape: vec![0, 5], data: NpyData::F32(vec![]) });
        assert_eq!(MappedNpy::open(&p).unwrap().as_f32().unwrap(), &[] as &[f32]);
    }

    #[test]
    fn npy_fortran_f16_is_read_row_major() {
        let dir = TempDir::new("fortran-f16");
        let p = dir.0.join("h.npy");
        let bits = |r: usize, c: usize| 0x3c00u16 + (r * 3 + c) as u16;
        let data = column_major(2, 3, bits);
        std::fs::write(&p, fortran_image("<f2", &[2, 3], bytemuck::cast_slice(&data))).unwrap();
        let want = row_major(2, 3, bits);
        assert_eq!(read(&p).unwrap().data, NpyData::F16(want.clone()));
        let m = MappedNpy::open(&p).unwrap();
        assert_eq!(m.header().dtype, DType::F16);
        assert_eq!(m.header().shape, vec![2, 3]);
        assert_eq!(m.as_f16_bits().unwrap(), &want[..]);
        assert!(m.as_f32().unwrap_err().to_string().contains("expected float32"));
    }

    #[test]
    fn npy_fortran_blocked_transpose_edges() {
        // Larger than a tile both ways and not a multiple of it: partial tiles and bands.
        let dir = TempDir::new("fortran-big");
        let p = dir.0.join("big.npy");
        let (n, v) = (130, 70);
        let value = |r: usize, c: usize| (r * 1000 + c) as f32;
        let data = column_major(n, v, value);
        std::fs::write(&p, fortran_image("<f4", &[n, v], bytemuck::cast_slice(&data))).unwrap();
        let want = row_major(n, v, value);
        assert_eq!(MappedNpy::open(&p).unwrap().as_f32().unwrap(), &want[..]);
        assert_eq!(read(&p).unwrap().data, NpyData::F32(want));
        // The other way round, and 8-byte and 4-byte integer elements.
        let (n, v) = (65, 129);
        let value = |r: usize, c: usize| (r * 1000 + c) as i64 - 5000;
        let data = column_major(n, v, value);
        std::fs::write(&p, fortran_image("<i8", &[n, v], bytemuck::cast_slice(&data))).unwrap();
        assert_eq!(read(&p).unwrap().data, NpyData::I64(row_major(n, v, value)));
        let value = |r: usize, c: usize| (r * 1000 + c) as i32;
        let data = column_major(n, v, value);
        std::fs::write(&p, fortran_image("<i4", &[n, v], bytemuck::cast_slice(&data))).unwrap();
        assert_eq!(read(&p).unwrap().data, NpyData::I32(row_major(n, v, value)));
    }

    #[test]
    fn npy_fortran_higher_rank_and_unaligned() {
        // Rank 3: element (i, j, l) of [3, 4, 70] at i + 3 * (j + 4 * l) in the file.
        let dir = TempDir::new("fortran-rank3");
        let p = dir.0.join("r3.npy");
        let (a, b, c) = (3, 4, 70);
        let value = |i: usize, j: usize, l: usize| (i * 10_000 + j * 100 + l) as f64;
        let mut data = vec![0f64; a * b * c];
        for i in 0..a {
            for j in 0..b {
                for l in 0..c {
                    data[i + a * (j + b * l)] = value(i, j, l);
                }
            }
        }
        std::fs::write(&p, fortran_image("<f8", &[a, b, c], bytemuck::cast_slice(&data))).unwrap();
        let want: Vec<f64> =
            (0..a).flat_map(|i| (0..b).flat_map(move |j| (0..c).map(move |l| value(i, j, l)))).collect();
        assert_eq!(read(&p).unwrap(), NpyArray { shape: vec![a, b, c], data: NpyData::F64(want) });

        // A header not padded to 64 bytes leaves the data unaligned: the transpose works
        // on bytes, so a Fortran file still reads (a C-order one says it is unaligned).
        let value = |r: usize, c: usize| (r * 10 + c) as f32;
        let data = column_major(3, 5, value);
        let dict = "{'descr': '<f4', 'fortran_order': True, 'shape': (3, 5), }\n";
        let mut image = b"\x93NUMPY\x01\x00".to_vec();
        image.extend_from_slice(&(dict.len() as u16).to_le_bytes());
        image.extend_from_slice(dict.as_bytes());
        assert_ne!(image.len() % 4, 0);
        image.extend_from_slice(bytemuck::cast_slice(&data));
        let q = dir.0.join("unaligned.npy");
        std::fs::write(&q, &image).unwrap();
        assert_eq!(MappedNpy::open(&q).unwrap().as_f32().unwrap(), &row_major(3, 5, value)[..]);
        assert_eq!(parse(&q, &image).unwrap().data, NpyData::F32(row_major(3, 5, value)));
    }

    #[test]
    fn npy_fortran_keeps_the_checks() {
        let dir = TempDir::new("fortran-checks");
        let p = dir.0.join("bad.npy");
        // Truncated data.
        let data = column_major(3, 5, |r, c| (r + c) as f32);
        let image = fortran_image("<f4", &[3, 5], bytemuck::cast_slice(&data));
        std::fs::write(&p, &image[..image.len() - 4]).unwrap();
        for e in [read(&p).unwrap_err(), MappedNpy::open(&p).err().unwrap()] {
            let e = e.to_string();
            assert!(e.contains("truncated") && e.contains("bad.npy"), "{e}");
        }
        // Unsupported dtype.
        std::fs::write(&p, fortran_image(">f4", &[3, 5], bytemuck::cast_slice(&data))).unwrap();
        assert!(read(&p).unwrap_err().to_string().contains("unsupported dtype '>f4'"));
        // A shape whose byte length overflows u64.
        let huge = 1usize << 62;
        std::fs::write(&p, fortran_image("<f4", &[huge, 2], &[])).unwrap();
        for e in [read(&p).unwrap_err(), MappedNpy::open(&p).err().unwrap()] {
            assert!(matches!(e, Error::Npy { .. }), "{e}");
            assert!(e.to_string().contains("too large"), "{e}");
        }
    }
}
