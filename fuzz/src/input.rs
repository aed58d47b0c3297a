//! Reading structured values out of fuzz bytes, and writing seeds in the
//! same format.
//!
//! [`Bytes`] never fails: past the end of the input every read returns
//! zeros (or an empty slice), so any byte string is a valid input and the
//! fuzzer's mutations stay meaningful. [`Seed`] writes the same layout, so
//! the seed corpus is produced by code that mirrors each target's decoder.

/// A little-endian reader over fuzz bytes.
#[derive(Debug, Clone)]
pub struct Bytes<'a> {
    data: &'a [u8],
}

impl<'a> Bytes<'a> {
    /// A reader over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// Whether every byte was consumed.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.data.split_at(n.min(self.data.len()));
        self.data = tail;
        head
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.take(self.data.len())
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let head = self.take(N);
        out[..head.len()].copy_from_slice(head);
        out
    }

    /// One byte.
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    /// A little-endian `u16`.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    /// A little-endian `u32`.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// A little-endian `u64`.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// Bit 0 of one byte.
    pub fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }

    /// A byte string with a `u16` length prefix (cut at the end of input).
    pub fn blob(&mut self) -> &'a [u8] {
        let len = usize::from(self.u16());
        self.take(len)
    }
}

/// Builds an input in the format [`Bytes`] reads.
#[derive(Debug, Default, Clone)]
pub struct Seed {
    buf: Vec<u8>,
}

impl Seed {
    /// An empty seed.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends raw bytes.
    pub fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(bytes);
        self
    }

    /// Appends one byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.bytes(&[v])
    }

    /// Appends a little-endian `u16`.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    /// Appends a little-endian `u32`.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    /// Appends a little-endian `u64`.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    /// Appends a byte string with a `u16` length prefix.
    pub fn blob(&mut self, bytes: &[u8]) -> &mut Self {
        let len = u16::try_from(bytes.len()).expect("seed blob over 64 KiB");
        self.u16(len).bytes(bytes)
    }

    /// The finished input.
    pub fn finish(&self) -> Vec<u8> {
        self.buf.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_past_the_end_are_zero() {
        let mut b = Bytes::new(&[1, 2, 3]);
        assert_eq!(b.u16(), 0x0201);
        assert_eq!(b.u32(), 3);
        assert_eq!(b.u64(), 0);
        assert!(b.is_empty());
        assert_eq!(b.blob(), &[] as &[u8]);
    }

    #[test]
    fn seed_round_trip() {
        let seed = Seed::new()
            .u8(7)
            .u16(0x1234)
            .u32(5)
            .u64(u64::MAX)
            .blob(b"abc")
            .finish();
        let mut b = Bytes::new(&seed);
        assert_eq!(
            (b.u8(), b.u16(), b.u32(), b.u64(), b.blob()),
            (7, 0x1234, 5, u64::MAX, &b"abc"[..])
        );
        assert!(b.is_empty());
    }
}
