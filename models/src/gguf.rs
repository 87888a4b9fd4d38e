//! Reading llama.cpp's GGUF files: candle's reader (`candle_core::quantized::gguf_file`),
//! behind the checks of what it trusts.
//!
//! candle 0.11 bounds every string and array by the file's size, but divides by a
//! `general.alignment` of 0 (a panic) and builds the block slice of a zero-element tensor from
//! a dangling, misaligned pointer (undefined behaviour); it also allocates a tensor's bytes
//! before reading them. Both were found by fuzzing (`fuzz/`, target `gguf`). [`read_content`]
//! walks the header first and refuses those files, and [`read_tensor`] reads only tensors that
//! are non-empty and lie inside the file.

use std::io::{Read, Seek, SeekFrom};

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::QTensor;
use candle_core::Device;

/// Nesting of arrays in metadata a file may use (llama.cpp writes none).
const MAX_ARRAY_DEPTH: usize = 4;

/// The header, metadata and tensor table of a GGUF file, refused with a message when they
/// would make candle's reader panic.
pub fn read_content<R: Read + Seek>(reader: &mut R) -> Result<Content, String> {
    let start = reader.stream_position().map_err(|e| e.to_string())?;
    let end = reader.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
    reader
        .seek(SeekFrom::Start(start))
        .map_err(|e| e.to_string())?;
    let mut walk = Walk {
        reader: &mut *reader,
        remaining: end.saturating_sub(start),
        wide: true,
    };
    walk.header()?;
    reader
        .seek(SeekFrom::Start(start))
        .map_err(|e| e.to_string())?;
    Content::read(reader).map_err(|e| e.to_string())
}

/// Tensor `name` of `content`, read from `reader` after checking that it has elements and
/// that its bytes lie inside the file.
pub fn read_tensor<R: Read + Seek>(
    content: &Content,
    reader: &mut R,
    name: &str,
    device: &Device,
) -> Result<QTensor, String> {
    let info = content
        .tensor_infos
        .get(name)
        .ok_or_else(|| format!("the GGUF file has no tensor {name}"))?;
    let dims = info.shape.dims();
    let elems = dims
        .iter()
        .try_fold(1u128, |n, &d| n.checked_mul(d as u128))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("tensor {name} has dimensions {dims:?}"))?;
    let block = info.ggml_dtype.block_size().max(1) as u128;
    let bytes = (elems / block).saturating_mul(info.ggml_dtype.type_size() as u128);
    let start = u128::from(content.tensor_data_offset) + u128::from(info.offset);
    let end = reader.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
    if start.saturating_add(bytes) > u128::from(end) {
        return Err(format!(
            "tensor {name} ({bytes} bytes at offset {start}) lies past the end of the file \
             ({end} bytes)"
        ));
    }
    content
        .tensor(reader, name, device)
        .map_err(|e| format!("tensor {name}: {e}"))
}

/// A bounded walk over the header: every length is checked against the bytes left.
struct Walk<'a, R> {
    reader: &'a mut R,
    remaining: u64,
    /// GGUF v2 and v3 write lengths as u64, v1 as u32.
    wide: bool,
}

impl<R: Read> Walk<'_, R> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], String> {
        if self.remaining < N as u64 {
            return Err("the GGUF header ends early".into());
        }
        let mut b = [0u8; N];
        self.reader.read_exact(&mut b).map_err(|e| e.to_string())?;
        self.remaining -= N as u64;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    fn length(&mut self) -> Result<u64, String> {
        if self.wide {
            Ok(u64::from_le_bytes(self.bytes()?))
        } else {
            Ok(u64::from(self.u32()?))
        }
    }

    fn skip(&mut self, n: u64) -> Result<(), String> {
        if n > self.remaining {
            return Err(format!(
                "the GGUF header claims {n} bytes where {} are left",
                self.remaining
            ));
        }
        let copied = std::io::copy(&mut (&mut *self.reader).take(n), &mut std::io::sink())
            .map_err(|e| e.to_string())?;
        if copied != n {
            return Err("the GGUF header ends early".into());
        }
        self.remaining -= n;
        Ok(())
    }

    fn string(&mut self) -> Result<Vec<u8>, String> {
        let len = self.length()?;
        if len > self.remaining {
            return Err(format!("a GGUF string of {len} bytes runs past the file"));
        }
        let mut s = vec![0u8; len as usize];
        self.reader.read_exact(&mut s).map_err(|e| e.to_string())?;
        self.remaining -= len;
        Ok(s)
    }

    fn header(&mut self) -> Result<(), String> {
        if &self.bytes::<4>()? != b"GGUF" {
            return Err("not a GGUF file (no GGUF magic)".into());
        }
        let version = self.u32()?;
        if !(1..=3).contains(&version) {
            return Err(format!("GGUF version {version} is not 1, 2 or 3"));
        }
        self.wide = version >= 2;
        let tensors = self.length()?;
        let kvs = self.length()?;
        for _ in 0..kvs {
            let mut key = self.string()?;
            // candle drops trailing NULs from strings, as some writers add them.
            while key.last() == Some(&0) {
                key.pop();
            }
            let kind = self.u32()?;
            if key == b"general.alignment" && matches!(kind, 0..=5) {
                let value = self.integer(kind)?;
                if value == 0 {
                    return Err("general.alignment is 0".into());
                }
            } else {
                self.value(kind, 0)?;
            }
        }
        for _ in 0..tensors {
            self.string()?;
            // candle allocates the dimensions before reading them; ggml has at most 4.
            let n_dims = self.u32()?;
            if n_dims > 4 {
                return Err(format!(
                    "a GGUF tensor with {n_dims} dimensions (at most 4)"
                ));
            }
            for _ in 0..n_dims {
                self.length()?;
            }
            self.u32()?;
            self.skip(8)?;
        }
        Ok(())
    }

    /// An integer metadata value of type 0..=5 (u8, i8, u16, i16, u32, i32).
    fn integer(&mut self, kind: u32) -> Result<i64, String> {
        Ok(match kind {
            0 => i64::from(self.bytes::<1>()?[0]),
            1 => i64::from(self.bytes::<1>()?[0] as i8),
            2 => i64::from(u16::from_le_bytes(self.bytes()?)),
            3 => i64::from(i16::from_le_bytes(self.bytes()?)),
            4 => i64::from(self.u32()?),
            _ => i64::from(i32::from_le_bytes(self.bytes()?)),
        })
    }

    fn fixed_size(kind: u32) -> Option<u64> {
        match kind {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        }
    }

    fn value(&mut self, kind: u32, depth: usize) -> Result<(), String> {
        if let Some(size) = Self::fixed_size(kind) {
            return self.skip(size);
        }
        match kind {
            8 => self.string().map(drop),
            9 if depth < MAX_ARRAY_DEPTH => {
                let item = self.u32()?;
                let n = self.length()?;
                match Self::fixed_size(item) {
                    Some(size) => self.skip(n.checked_mul(size).ok_or("array too long")?),
                    None => {
                        // Every string or array item takes at least 4 bytes.
                        if n > self.remaining / 4 {
                            return Err(format!("a GGUF array of {n} items runs past the file"));
                        }
                        (0..n).try_for_each(|_| self.value(item, depth + 1))
                    }
                }
            }
            9 => Err("GGUF arrays nested too deep".into()),
            other => Err(format!("unknown GGUF value type {other}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn string(s: &str) -> Vec<u8> {
        let mut b = (s.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(s.as_bytes());
        b
    }

    /// A v3 file with the given metadata and one f32 tensor of `dims`, holding `data`.
    fn gguf(kvs: &[(&str, u32, Vec<u8>)], dims: &[u64], data: &[u8]) -> Vec<u8> {
        let mut f = b"GGUF".to_vec();
        f.extend_from_slice(&3u32.to_le_bytes());
        f.extend_from_slice(&1u64.to_le_bytes());
        f.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
        for (key, kind, value) in kvs {
            f.extend(string(key));
            f.extend_from_slice(&kind.to_le_bytes());
            f.extend_from_slice(value);
        }
        f.extend(string("token_embd.weight"));
        f.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            f.extend_from_slice(&d.to_le_bytes());
        }
        f.extend_from_slice(&0u32.to_le_bytes());
        f.extend_from_slice(&0u64.to_le_bytes());
        f.resize(f.len().div_ceil(32) * 32, 0);
        f.extend_from_slice(data);
        f
    }

    #[test]
    fn a_well_formed_file_reads_with_its_tensor() {
        let data: Vec<u8> = (0..8).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let file = gguf(
            &[("general.architecture", 8, string("llama"))],
            &[4, 2],
            &data,
        );
        let mut r = Cursor::new(file);
        let content = read_content(&mut r).unwrap();
        let t = read_tensor(&content, &mut r, "token_embd.weight", &Device::Cpu).unwrap();
        assert_eq!(t.shape().dims(), &[2, 4]);
    }

    #[test]
    fn alignment_zero_is_refused_instead_of_dividing_by_it() {
        let file = gguf(
            &[("general.alignment", 4, 0u32.to_le_bytes().to_vec())],
            &[1],
            &[0; 4],
        );
        let err = read_content(&mut Cursor::new(file)).unwrap_err();
        assert!(err.contains("general.alignment is 0"), "{err}");
        // The key as candle reads it: trailing NULs dropped.
        let file = gguf(&[("general.alignment\0\0", 0, vec![0])], &[1], &[0; 4]);
        let err = read_content(&mut Cursor::new(file)).unwrap_err();
        assert!(err.contains("general.alignment is 0"), "{err}");
    }

    #[test]
    fn empty_and_out_of_file_tensors_are_refused() {
        for (dims, data) in [(vec![0u64, 4], vec![]), (vec![1024, 1024], vec![0u8; 16])] {
            let file = gguf(&[], &dims, &data);
            let mut r = Cursor::new(file);
            let content = read_content(&mut r).unwrap();
            let err = read_tensor(&content, &mut r, "token_embd.weight", &Device::Cpu).unwrap_err();
            assert!(err.contains("token_embd.weight"), "{err}");
        }
    }

    #[test]
    fn lengths_past_the_file_are_refused() {
        let mut file = gguf(&[], &[1], &[0; 4]);
        // A key whose length claims far more bytes than the file has.
        file.truncate(24);
        file[16..24].copy_from_slice(&1u64.to_le_bytes());
        file.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(read_content(&mut Cursor::new(file)).is_err());
    }
}
