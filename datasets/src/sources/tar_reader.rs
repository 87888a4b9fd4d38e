//! A streaming reader for the tar members WebDataset shards hold.
//!
//! Why not the `tar` crate: its entries borrow the archive, so a source that owns an open
//! shard and hands out one sample per `next()` would have to borrow from itself. This reader
//! owns its input and keeps only the header being read plus the data asked for.
//!
//! It reads what the writers of WebDataset shards produce: POSIX ustar (name prefix), GNU
//! (`L` long names, base-256 sizes) and pax (`x` headers' `path` and `size`, as Python's
//! `tarfile` writes by default). Other entries (directories, links, global pax headers) are
//! stepped over. Header checksums are verified, so a file that is not a tar archive, or a
//! shard damaged part way, is reported rather than read as garbage.

use std::io::{self, Read};

const BLOCK: u64 = 512;

/// GNU long names and pax headers are a few hundred bytes; a larger one means corruption.
const MAX_METADATA: u64 = 1 << 20;

/// A regular file in the archive; its data follows.
pub(super) struct Member {
    pub name: String,
}

pub(super) struct TarReader<R> {
    inner: R,
    /// Bytes read so far, for error messages.
    offset: u64,
    /// Data of the current member not yet read.
    unread: u64,
    /// Zero padding after the current member's data, up to the next block.
    padding: u64,
}

impl<R: Read> TarReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            offset: 0,
            unread: 0,
            padding: 0,
        }
    }

    /// The next regular file, or `None` at the end of the archive (a zero block, or the end
    /// of the input at a block boundary, as Python's `tarfile` also accepts). Its data is
    /// read with [`TarReader::read_data`], or skipped by the next call.
    pub fn next_member(&mut self) -> io::Result<Option<Member>> {
        let mut long_name = None;
        let mut pax_path = None;
        let mut pax_size = None;
        loop {
            self.skip(self.unread + self.padding)?;
            let Some(block) = self.read_block()? else {
                return Ok(None);
            };
            if block.iter().all(|&b| b == 0) {
                return Ok(None);
            }
            let header = Header::parse(&block).map_err(|m| self.error(m))?;
            self.unread = header.size;
            self.padding = (BLOCK - header.size % BLOCK) % BLOCK;
            match header.kind {
                b'0' | b'\0' | b'7' => {
                    if let Some(size) = pax_size {
                        self.unread = size;
                        self.padding = (BLOCK - size % BLOCK) % BLOCK;
                    }
                    let name = pax_path.or(long_name).unwrap_or(header.name);
                    return Ok(Some(Member { name }));
                }
                b'L' => long_name = Some(c_string(&self.read_metadata()?)),
                b'x' => {
                    let data = self.read_metadata()?;
                    for (key, value) in parse_pax(&data).map_err(|m| self.error(m))? {
                        match key {
                            "path" => pax_path = Some(value.to_string()),
                            "size" => {
                                let size = value
                                    .parse()
                                    .map_err(|_| self.error(format!("bad pax size {value:?}")))?;
                                pax_size = Some(size);
                            }
                            _ => {}
                        }
                    }
                }
                // A global pax header, or a link's long target name: nothing a file needs.
                b'g' | b'K' => {}
                // Directories, links, devices: their metadata belonged to them.
                _ => {
                    long_name = None;
                    pax_path = None;
                    pax_size = None;
                }
            }
        }
    }

    /// All the data of the current member.
    pub fn read_data(&mut self) -> io::Result<Vec<u8>> {
        let expected = self.unread;
        let mut data = Vec::new();
        (&mut self.inner).take(expected).read_to_end(&mut data)?;
        self.offset += data.len() as u64;
        self.unread = 0;
        if (data.len() as u64) < expected {
            return Err(self.truncated());
        }
        Ok(data)
    }

    fn read_metadata(&mut self) -> io::Result<Vec<u8>> {
        if self.unread > MAX_METADATA {
            return Err(self.error(format!("a {}-byte long-name or pax header", self.unread)));
        }
        self.read_data()
    }

    fn skip(&mut self, n: u64) -> io::Result<()> {
        let skipped = io::copy(&mut (&mut self.inner).take(n), &mut io::sink())?;
        self.offset += skipped;
        if skipped < n {
            return Err(self.truncated());
        }
        self.unread = 0;
        self.padding = 0;
        Ok(())
    }

    fn read_block(&mut self) -> io::Result<Option<[u8; BLOCK as usize]>> {
        let mut block = [0; BLOCK as usize];
        let mut filled = 0;
        while filled < block.len() {
            match self.inner.read(&mut block[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.offset += filled as u64;
        match filled {
            0 => Ok(None),
            512 => Ok(Some(block)),
            _ => Err(self.truncated()),
        }
    }

    fn truncated(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("truncated tar archive: it ends at byte {}", self.offset),
        )
    }

    fn error(&self, message: String) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad tar header before byte {}: {message}", self.offset),
        )
    }
}

struct Header {
    name: String,
    size: u64,
    kind: u8,
}

impl Header {
    fn parse(block: &[u8; BLOCK as usize]) -> Result<Self, String> {
        let stored = parse_octal(&block[148..156])
            .ok_or("unreadable checksum field (not a tar archive?)")?;
        // The checksum is the byte sum with its own field read as spaces; some old writers
        // summed signed bytes.
        let field = 148..156;
        let byte = |(i, &b): (usize, &u8)| if field.contains(&i) { b' ' } else { b };
        let unsigned: u64 = block.iter().enumerate().map(|p| u64::from(byte(p))).sum();
        let signed: i64 = block
            .iter()
            .enumerate()
            .map(|p| i64::from(byte(p) as i8))
            .sum();
        if stored != unsigned && Some(stored) != u64::try_from(signed).ok() {
            return Err("checksum mismatch (not a tar archive, or corrupt)".to_string());
        }
        let size = parse_size(&block[124..136]).ok_or("unreadable size field")?;
        let mut name = c_string(&block[..100]);
        // POSIX ustar splits long paths into prefix/name; GNU's magic ("ustar  ") uses those
        // bytes for other fields.
        if &block[257..263] == b"ustar\0" {
            let prefix = c_string(&block[345..500]);
            if !prefix.is_empty() {
                name = format!("{prefix}/{name}");
            }
        }
        Ok(Self {
            name,
            size,
            kind: block[156],
        })
    }
}

/// The bytes up to the first NUL; names that are not UTF-8 are kept readable, not rejected.
fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// An octal field, padded with spaces or NULs; empty reads as 0.
fn parse_octal(field: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(field).ok()?;
    let text = text.trim_matches(|c| c == ' ' || c == '\0');
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

/// A size field: octal, or GNU base-256 (high bit set) for members of 8 GiB and more.
fn parse_size(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 == 0 {
        return parse_octal(field);
    }
    if field[0] & 0x40 != 0 {
        return None; // negative
    }
    field[1..]
        .iter()
        .try_fold(u64::from(field[0] & 0x3f), |acc, &b| {
            acc.checked_mul(256)?.checked_add(u64::from(b))
        })
}

/// Pax records, `"<length> <key>=<value>\n"` where the length counts the whole record.
fn parse_pax(data: &[u8]) -> Result<Vec<(&str, &str)>, String> {
    let bad = || "malformed pax header".to_string();
    let mut records = Vec::new();
    let mut rest = data;
    while !rest.is_empty() && rest[0] != 0 {
        let space = rest.iter().position(|&b| b == b' ').ok_or_else(bad)?;
        let length: usize = std::str::from_utf8(&rest[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)?;
        if length <= space + 1 || length > rest.len() || rest[length - 1] != b'\n' {
            return Err(bad());
        }
        let record = std::str::from_utf8(&rest[space + 1..length - 1]).map_err(|_| bad())?;
        records.push(record.split_once('=').ok_or_else(bad)?);
        rest = &rest[length..];
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ustar header block for `name` with `size` bytes of data of type `kind`.
    fn header(name: &str, size: usize, kind: u8) -> Vec<u8> {
        let mut block = vec![0u8; 512];
        block[..name.len()].copy_from_slice(name.as_bytes());
        block[100..108].copy_from_slice(b"0000644\0");
        block[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        block[156] = kind;
        block[257..263].copy_from_slice(b"ustar\0");
        block[263..265].copy_from_slice(b"00");
        block[148..156].copy_from_slice(b"        ");
        let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
        block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        block
    }

    fn member(archive: &mut Vec<u8>, name: &str, kind: u8, data: &[u8]) {
        archive.extend(header(name, data.len(), kind));
        archive.extend(data);
        archive.resize(archive.len().div_ceil(512) * 512, 0);
    }

    fn read_all(archive: &[u8]) -> io::Result<Vec<(String, Vec<u8>)>> {
        let mut reader = TarReader::new(archive);
        let mut members = Vec::new();
        while let Some(m) = reader.next_member()? {
            members.push((m.name, reader.read_data()?));
        }
        Ok(members)
    }

    #[test]
    fn pax_path_and_size_override_the_header() {
        let long = format!("{}/0001.txt", "d".repeat(150));
        let record = format!("path={long}\n");
        let pax = format!("{} {record}9 size=9\n", record.len() + 4);
        let mut archive = Vec::new();
        member(&mut archive, "PaxHeaders/0001.txt", b'x', pax.as_bytes());
        // The header's own size field says 0; the pax size is the one to trust.
        archive.extend(header("short.txt", 0, b'0'));
        archive.extend(b"a caption");
        archive.resize(archive.len().div_ceil(512) * 512, 0);
        member(&mut archive, "0002.txt", b'0', b"next");
        archive.extend([0; 1024]);
        let members = read_all(&archive).unwrap();
        assert_eq!(members[0], (long, b"a caption".to_vec()));
        assert_eq!(members[1], ("0002.txt".to_string(), b"next".to_vec()));
    }

    #[test]
    fn directories_and_global_headers_are_stepped_over() {
        let mut archive = Vec::new();
        member(
            &mut archive,
            "pax_global_header",
            b'g',
            b"20 comment=abcdefgh\n",
        );
        member(&mut archive, "dir/", b'5', b"");
        member(&mut archive, "dir/0001.txt", b'0', b"x");
        let members = read_all(&archive).unwrap();
        assert_eq!(members, vec![("dir/0001.txt".to_string(), b"x".to_vec())]);
    }

    #[test]
    fn truncated_data_and_bad_checksums_are_errors() {
        let mut archive = Vec::new();
        member(&mut archive, "0001.txt", b'0', &[7; 600]);
        let truncated = &archive[..700];
        let err = read_all(truncated).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");

        let mut corrupt = archive.clone();
        corrupt[10] ^= 1;
        let err = read_all(&corrupt).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
    }

    #[test]
    fn base256_sizes_are_read() {
        let mut field = [0u8; 12];
        field[0] = 0x80;
        field[4..].copy_from_slice(&(9u64 << 30).to_be_bytes());
        assert_eq!(parse_size(&field), Some(9 << 30));
    }
}
