//! What both sides of tidevm's vsock tests agree on: the byte pattern sent
//! and the checksum of what arrived; and the guest side's vsock sockets
//! ([`socket`]), shared by `vsock-probe` and `sandbox-agent`.

pub mod socket;

/// FNV-1a, 64 bits: a checksum both sides compute the same way.
#[derive(Debug, Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    /// Adds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// The checksum so far.
    pub fn value(&self) -> u64 {
        self.0
    }
}

/// Byte `i` of the test pattern.
pub fn pattern(i: u64) -> u8 {
    let x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x.to_be_bytes()[0] ^ i.to_le_bytes()[0]
}

/// Fills `buf` with the pattern bytes starting at byte `offset`.
pub fn fill_pattern(buf: &mut [u8], offset: u64) {
    for (i, b) in (offset..).zip(buf.iter_mut()) {
        *b = pattern(i);
    }
}

/// Writes the first `len` pattern bytes to `to`, 64 KiB at a time;
/// returns their checksum.
pub fn write_pattern(to: &mut impl std::io::Write, len: u64) -> std::io::Result<u64> {
    let mut sum = Fnv::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut done = 0u64;
    while done < len {
        let n = usize::try_from(len - done).map_or(buf.len(), |left| left.min(buf.len()));
        fill_pattern(&mut buf[..n], done);
        to.write_all(&buf[..n])?;
        sum.update(&buf[..n]);
        done += n as u64;
    }
    Ok(sum.value())
}

/// The checksum of the first `len` pattern bytes.
pub fn pattern_sum(len: u64) -> u64 {
    write_pattern(&mut std::io::sink(), len).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_and_pattern_are_stable() {
        let mut f = Fnv::default();
        f.update(b"a");
        assert_eq!(f.value(), 0xaf63_dc4c_8601_ec8c);
        let p: Vec<u8> = (0..4).map(pattern).collect();
        assert_eq!(p, (0..4).map(pattern).collect::<Vec<_>>());
        assert_ne!(pattern(0), pattern(1));
        let mut buf = [0u8; 5];
        fill_pattern(&mut buf, 3);
        assert_eq!(buf.to_vec(), (3..8).map(pattern).collect::<Vec<_>>());
        let mut f = Fnv::default();
        f.update(&(0..100_000).map(pattern).collect::<Vec<_>>());
        assert_eq!(pattern_sum(100_000), f.value());
    }
}
