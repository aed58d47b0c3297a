//! Memory statistics reported by the guest on the statistics queue.
//!
//! The driver fills one device-readable buffer with packed entries of
//! `(le16 tag, le64 value)`, 10 bytes each. Memory amounts are in bytes,
//! fault and hugetlb numbers are event counts.

/// Bytes swapped in.
pub const VIRTIO_BALLOON_S_SWAP_IN: u16 = 0;
/// Bytes swapped out.
pub const VIRTIO_BALLOON_S_SWAP_OUT: u16 = 1;
/// Major page faults.
pub const VIRTIO_BALLOON_S_MAJFLT: u16 = 2;
/// Minor page faults.
pub const VIRTIO_BALLOON_S_MINFLT: u16 = 3;
/// Free memory, bytes.
pub const VIRTIO_BALLOON_S_MEMFREE: u16 = 4;
/// Total memory, bytes.
pub const VIRTIO_BALLOON_S_MEMTOT: u16 = 5;
/// Available memory (as in /proc/meminfo MemAvailable), bytes.
pub const VIRTIO_BALLOON_S_AVAIL: u16 = 6;
/// Disk caches, bytes.
pub const VIRTIO_BALLOON_S_CACHES: u16 = 7;
/// Successful hugetlb page allocations.
pub const VIRTIO_BALLOON_S_HTLB_PGALLOC: u16 = 8;
/// Failed hugetlb page allocations.
pub const VIRTIO_BALLOON_S_HTLB_PGFAIL: u16 = 9;

/// Size in bytes of one packed statistics entry.
pub const STAT_ENTRY_SIZE: usize = 10;

/// The latest statistics the guest reported. A field is `None` when the
/// guest did not include that tag.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BalloonStats {
    /// When the device received these statistics, in milliseconds since the
    /// Unix epoch (host wall clock).
    pub update_time_ms: u64,
    /// Bytes swapped in (`SWAP_IN`).
    pub swap_in: Option<u64>,
    /// Bytes swapped out (`SWAP_OUT`).
    pub swap_out: Option<u64>,
    /// Major page faults (`MAJFLT`).
    pub major_faults: Option<u64>,
    /// Minor page faults (`MINFLT`).
    pub minor_faults: Option<u64>,
    /// Free memory in bytes (`MEMFREE`).
    pub free_memory: Option<u64>,
    /// Total memory in bytes (`MEMTOT`).
    pub total_memory: Option<u64>,
    /// Available memory in bytes (`AVAIL`).
    pub available_memory: Option<u64>,
    /// Disk caches in bytes (`CACHES`).
    pub disk_caches: Option<u64>,
    /// Successful hugetlb allocations (`HTLB_PGALLOC`).
    pub hugetlb_allocations: Option<u64>,
    /// Failed hugetlb allocations (`HTLB_PGFAIL`).
    pub hugetlb_failures: Option<u64>,
}

impl BalloonStats {
    /// Records `value` for `tag`; returns false (and changes nothing) for
    /// tags this device does not know.
    pub fn set(&mut self, tag: u16, value: u64) -> bool {
        let slot = match tag {
            VIRTIO_BALLOON_S_SWAP_IN => &mut self.swap_in,
            VIRTIO_BALLOON_S_SWAP_OUT => &mut self.swap_out,
            VIRTIO_BALLOON_S_MAJFLT => &mut self.major_faults,
            VIRTIO_BALLOON_S_MINFLT => &mut self.minor_faults,
            VIRTIO_BALLOON_S_MEMFREE => &mut self.free_memory,
            VIRTIO_BALLOON_S_MEMTOT => &mut self.total_memory,
            VIRTIO_BALLOON_S_AVAIL => &mut self.available_memory,
            VIRTIO_BALLOON_S_CACHES => &mut self.disk_caches,
            VIRTIO_BALLOON_S_HTLB_PGALLOC => &mut self.hugetlb_allocations,
            VIRTIO_BALLOON_S_HTLB_PGFAIL => &mut self.hugetlb_failures,
            _ => return false,
        };
        *slot = Some(value);
        true
    }
}

/// The result of decoding a statistics buffer.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ParsedStats {
    /// The values found (with `update_time_ms` as passed to [`parse_stats`]).
    pub stats: BalloonStats,
    /// Entries with a tag this device does not know (ignored).
    pub unknown_tags: u32,
    /// The buffer length was not a multiple of the entry size; the trailing
    /// partial entry was ignored.
    pub malformed: bool,
}

/// Decodes a statistics buffer of packed `(le16 tag, le64 value)` entries.
///
/// A tag that appears twice keeps its last value.
pub fn parse_stats(bytes: &[u8], update_time_ms: u64) -> ParsedStats {
    let chunks = bytes.chunks_exact(STAT_ENTRY_SIZE);
    let mut parsed = ParsedStats {
        stats: BalloonStats {
            update_time_ms,
            ..BalloonStats::default()
        },
        unknown_tags: 0,
        malformed: !chunks.remainder().is_empty(),
    };
    for entry in chunks {
        let tag = u16::from_le_bytes([entry[0], entry[1]]);
        let value = u64::from_le_bytes([
            entry[2], entry[3], entry[4], entry[5], entry[6], entry[7], entry[8], entry[9],
        ]);
        if !parsed.stats.set(tag, value) {
            parsed.unknown_tags = parsed.unknown_tags.saturating_add(1);
        }
    }
    parsed
}

#[cfg(test)]
pub(crate) fn encode_stats(entries: &[(u16, u64)]) -> Vec<u8> {
    entries
        .iter()
        .flat_map(|(tag, val)| {
            let mut e = tag.to_le_bytes().to_vec();
            e.extend_from_slice(&val.to_le_bytes());
            e
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_all_known_tags() {
        let entries: Vec<(u16, u64)> = (0..10).map(|t| (t, 1000 + u64::from(t))).collect();
        let parsed = parse_stats(&encode_stats(&entries), 42);
        assert!(!parsed.malformed);
        assert_eq!(parsed.unknown_tags, 0);
        assert_eq!(
            parsed.stats,
            BalloonStats {
                update_time_ms: 42,
                swap_in: Some(1000),
                swap_out: Some(1001),
                major_faults: Some(1002),
                minor_faults: Some(1003),
                free_memory: Some(1004),
                total_memory: Some(1005),
                available_memory: Some(1006),
                disk_caches: Some(1007),
                hugetlb_allocations: Some(1008),
                hugetlb_failures: Some(1009),
            }
        );
    }

    #[test]
    fn unknown_tags_missing_tags_and_trailing_bytes() {
        let mut bytes = encode_stats(&[
            (VIRTIO_BALLOON_S_MEMFREE, 1 << 30),
            (77, 5),
            (VIRTIO_BALLOON_S_MEMFREE, u64::MAX),
            (VIRTIO_BALLOON_S_MEMTOT, 4 << 30),
        ]);
        bytes.extend_from_slice(&[4, 0, 1]);
        let parsed = parse_stats(&bytes, 7);
        assert!(parsed.malformed);
        assert_eq!(parsed.unknown_tags, 1);
        assert_eq!(parsed.stats.free_memory, Some(u64::MAX));
        assert_eq!(parsed.stats.total_memory, Some(4 << 30));
        assert_eq!(parsed.stats.swap_in, None);
        assert_eq!(parsed.stats.update_time_ms, 7);

        let empty = parse_stats(&[], 1);
        assert!(!empty.malformed);
        assert_eq!(empty.stats.available_memory, None);
    }
}
