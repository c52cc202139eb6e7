//! A byte stream that keeps the CRC-32 of every byte through it: the frame
//! of the store's snapshots and of its index checkpoints, which both end
//! with the checksum of everything before it.

use std::io::{Read, Write};

use crate::MvccError;

/// Reads grow a buffer by at most this much before the bytes arrive, so a
/// damaged length cannot make a reader allocate much.
const READ_STEP: usize = 64 * 1024;

/// A stream with the CRC-32 of every byte through it so far.
pub(crate) struct Summed<T> {
    inner: T,
    crc: crc32fast::Hasher,
    bytes: u64,
}

impl<T> Summed<T> {
    pub(crate) fn new(inner: T) -> Summed<T> {
        Summed {
            inner,
            crc: crc32fast::Hasher::new(),
            bytes: 0,
        }
    }

    fn sum(&mut self, bytes: &[u8]) {
        self.crc.update(bytes);
        self.bytes += bytes.len() as u64;
    }
}

impl<W: Write> Summed<W> {
    pub(crate) fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.sum(bytes);
        self.inner.write_all(bytes)
    }

    /// A byte string with its length (u32, big-endian) before it.
    pub(crate) fn put_bytes(&mut self, bytes: &[u8]) -> Result<(), MvccError> {
        let len = u32::try_from(bytes.len())
            .map_err(|_| MvccError::Corrupt(format!("record of {} bytes", bytes.len())))?;
        self.put(&len.to_be_bytes())?;
        Ok(self.put(bytes)?)
    }

    /// Writes the checksum of everything so far; returns the stream and the
    /// bytes written in all.
    pub(crate) fn finish(mut self) -> std::io::Result<(W, u64)> {
        let crc = self.crc.clone().finalize();
        self.inner.write_all(&crc.to_be_bytes())?;
        self.inner.flush()?;
        Ok((self.inner, self.bytes + 4))
    }
}

impl<R: Read> Summed<R> {
    /// The next `N` bytes; a stream that ends first is an `UnexpectedEof`
    /// saying after how many bytes.
    pub(crate) fn take<const N: usize>(&mut self) -> std::io::Result<[u8; N]> {
        let mut buf = [0; N];
        if let Err(e) = self.inner.read_exact(&mut buf) {
            return Err(self.ended_early(e, 0));
        }
        self.sum(&buf);
        Ok(buf)
    }

    /// The next `len` bytes into `buf` (cleared first).
    pub(crate) fn take_into(&mut self, len: usize, buf: &mut Vec<u8>) -> std::io::Result<()> {
        buf.clear();
        buf.reserve(len.min(READ_STEP));
        // Take grows the vector only as bytes arrive.
        (&mut self.inner).take(len as u64).read_to_end(buf)?;
        if buf.len() < len {
            let got = buf.len() as u64;
            return Err(self.ended_early(std::io::ErrorKind::UnexpectedEof.into(), got));
        }
        self.crc.update(buf);
        self.bytes += len as u64;
        Ok(())
    }

    pub(crate) fn take_vec(&mut self, len: usize) -> std::io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        self.take_into(len, &mut buf)?;
        Ok(buf)
    }

    /// Reads the stored checksum that ends the stream; `Err((computed,
    /// stored))` when it is not the checksum of what came before.
    pub(crate) fn check_sum(&mut self) -> std::io::Result<Result<(), (u32, u32)>> {
        let crc = self.crc.clone().finalize();
        let stored = u32::from_be_bytes(self.take()?);
        Ok(if stored == crc {
            Ok(())
        } else {
            Err((crc, stored))
        })
    }

    fn ended_early(&self, e: std::io::Error, more: u64) -> std::io::Error {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            let at = self.bytes + more;
            std::io::Error::new(e.kind(), format!("ends early, after {at} bytes"))
        } else {
            e
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::Result;

    #[test]
    fn what_is_written_reads_back_and_checks() -> Result {
        let mut out = Summed::new(Vec::new());
        out.put(b"head")?;
        out.put_bytes(b"record")?;
        let (bytes, len) = out.finish()?;
        assert_eq!(len, bytes.len() as u64);

        let mut input = Summed::new(&bytes[..]);
        assert_eq!(&input.take::<4>()?, b"head");
        let len = u32::from_be_bytes(input.take()?);
        assert_eq!(input.take_vec(len as usize)?, b"record");
        assert_eq!(input.check_sum()?, Ok(()));
        Ok(())
    }

    #[test]
    fn a_flipped_byte_fails_the_sum_and_a_cut_stream_says_where() -> Result {
        let mut out = Summed::new(Vec::new());
        out.put_bytes(b"record")?;
        let (mut bytes, _) = out.finish()?;
        bytes[5] ^= 1;
        let mut input = Summed::new(&bytes[..]);
        input.take::<4>()?;
        input.take_vec(6)?;
        assert!(input.check_sum()?.is_err());

        let mut input = Summed::new(&bytes[..7]);
        input.take::<4>()?;
        let Err(e) = input.take_vec(6) else {
            return Err(MvccError::Corrupt("a cut stream read whole".into()));
        };
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
        assert_eq!(e.to_string(), "ends early, after 7 bytes");
        Ok(())
    }
}
