//! A small, strict reader and writer for NumPy's `.npy` format (versions 1–3), enough
//! for logits, targets and results: little-endian `f4`, `f8`, `i4`, `i8`, C order
//! (Fortran order only for 1-D arrays, where it is the same thing). Everything else is
//! refused with a message naming the file and what is wrong.

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
    /// Byte offset of the data.
    pub data_offset: usize,
}

/// Reads and checks the header of `path`.
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
    let (dtype, fortran, shape) = parse_dict(&text).map_err(|m| bad(path, m))?;
    if fortran && shape.len() > 1 {
        return Err(bad(
            path,
            "Fortran-order (column-major) arrays are not supported; save with np.ascontiguousarray",
        ));
    }
    Ok(Header { dtype, shape, data_offset: pre_len + len })
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
pub struct MappedNpy {
    path: PathBuf,
    header: Header,
    map: memmap2::Mmap,
}

impl MappedNpy {
    /// Maps `path` read-only after checking its header and length.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mut file = File::open(path).map_err(io(path))?;
        let header = read_header(path, &mut file)?;
        let count = element_count(path, &header)?;
        check_length(path, &header, count, file.metadata().map_err(io(path))?.len())?;
        // SAFETY: the map is read-only; like every reader of a file, we rely on no other
        // process truncating it while it is in use.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io(path))?;
        Ok(Self { path: path.to_path_buf(), header, map })
    }

    /// The header (dtype and shape).
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The data as raw float16 bits, in place. Fails unless the dtype is float16.
    pub fn as_f16_bits(&self) -> Result<&[u16]> {
        if self.header.dtype != DType::F16 {
            return Err(bad(&self.path, format!("expected float16 data, found {:?}", self.header.dtype)));
        }
        bytemuck::try_cast_slice(&self.map[self.header.data_offset..])
            .map_err(|e| bad(&self.path, format!("data is not 2-byte aligned in the file: {e}")))
    }

    /// The data as f32, in place. Fails unless the dtype is float32.
    pub fn as_f32(&self) -> Result<&[f32]> {
        if self.header.dtype != DType::F32 {
            return Err(bad(&self.path, format!("expected float32 data, found {:?}", self.header.dtype)));
        }
        bytemuck::try_cast_slice(&self.map[self.header.data_offset..])
            .map_err(|e| bad(&self.path, format!("data is not 4-byte aligned in the file: {e}")))
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
}

impl NpyWriter {
    /// Creates the temporary file with `shape` and maps its data for writing.
    pub fn create(path: impl AsRef<Path>, shape: &[usize]) -> Result<Self> {
        let path = path.as_ref();
        let tmp = temp_path(path);
        let header = header_bytes("<f4", shape);
        let count: usize = shape.iter().product();
        let mut writer = Self { path: path.to_path_buf(), tmp: tmp.clone(), offset: header.len(), map: None };
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
        Ok(writer)
    }

    /// The data to fill, as f32.
    pub fn data_mut(&mut self) -> &mut [f32] {
        let offset = self.offset;
        let map = self.map.as_mut().expect("mapped until commit");
        bytemuck::cast_slice_mut(&mut map[offset..])
    }

    /// Flushes the data and renames the file into place.
    pub fn commit(mut self) -> Result<()> {
        let map = self.map.take().expect("mapped until commit");
        let err = |source| Error::Io { path: self.path.clone(), source };
        map.flush().map_err(err)?;
        drop(map);
        std::fs::rename(&self.tmp, &self.path).map_err(err)
    }
}

impl Drop for NpyWriter {
    fn drop(&mut self) {
        if self.map.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
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

/// Reads a whole `.npy` file (the data is read straight into the typed vector: one copy).
pub fn read(path: impl AsRef<Path>) -> Result<NpyArray> {
    let path = path.as_ref();
    let mut file = File::open(path).map_err(io(path))?;
    let len = file.metadata().map_err(io(path))?.len();
    read_from(path, &mut file, len)
}

/// Parses a whole `.npy` image held in memory (`path` only names it in messages).
pub fn parse(path: &Path, bytes: &[u8]) -> Result<NpyArray> {
    read_from(path, &mut &bytes[..], bytes.len() as u64)
}

fn read_from(path: &Path, reader: &mut impl Read, total_len: u64) -> Result<NpyArray> {
    let header = read_header(path, reader)?;
    let count = element_count(path, &header)?;
    check_length(path, &header, count, total_len)?;
    fn fill<T: bytemuck::Pod + Default>(path: &Path, reader: &mut impl Read, count: usize) -> Result<Vec<T>> {
        let mut v = vec![T::default(); count];
        reader.read_exact(bytemuck::cast_slice_mut(&mut v)).map_err(io(path))?;
        Ok(v)
    }
    let data = match header.dtype {
        DType::F16 => NpyData::F16(fill(path, reader, count)?),
        DType::F32 => NpyData::F32(fill(path, reader, count)?),
        DType::F64 => NpyData::F64(fill(path, reader, count)?),
        DType::I32 => NpyData::I32(fill(path, reader, count)?),
        DType::I64 => NpyData::I64(fill(path, reader, count)?),
    };
    Ok(NpyArray { shape: header.shape, data })
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
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".xent-tmp-{}", std::process::id()));
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
        // Fortran order, 2-D.
        let mut h = header_bytes("<f4", &[2, 2]);
        let at = h.windows(5).position(|w| w == b"False").unwrap();
        h.splice(at..at + 5, b"True ".iter().copied());
        h.extend_from_slice(bytemuck::cast_slice(&[0f32; 4]));
        std::fs::write(&q, &h).unwrap();
        assert!(read(&q).unwrap_err().to_string().contains("Fortran"));
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
}
