//! Target `balloon_stats`: decoding of the balloon statistics buffer
//! (packed `le16 tag, le64 value` entries).
//!
//! Invariants checked:
//! - no panic;
//! - the buffer is malformed exactly when its length is not a multiple of
//!   10; every known tag's last value is reported, every unknown tag is
//!   counted; the update time is the one given.

use devices::virtio::balloon::stats::{parse_stats, STAT_ENTRY_SIZE};
use devices::virtio::balloon::BalloonStats;

use crate::input::Seed;

/// Runs one input.
pub fn run(data: &[u8]) {
    let parsed = parse_stats(data, 42);
    assert_eq!(
        parsed.malformed,
        !data.len().is_multiple_of(STAT_ENTRY_SIZE)
    );
    let mut model = BalloonStats {
        update_time_ms: 42,
        ..BalloonStats::default()
    };
    let mut unknown = 0u32;
    for e in data.chunks_exact(STAT_ENTRY_SIZE) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let value = u64::from_le_bytes(e[2..10].try_into().expect("8 bytes"));
        if !model.set(tag, value) {
            unknown += 1;
        }
    }
    assert_eq!(parsed.stats, model);
    assert_eq!(parsed.unknown_tags, unknown);
}

/// Seed inputs.
pub fn seeds() -> Vec<Vec<u8>> {
    let entries = |list: &[(u16, u64)]| {
        let mut s = Seed::new();
        for &(t, v) in list {
            s.u16(t).u64(v);
        }
        s.finish()
    };
    let all: Vec<(u16, u64)> = (0..10).map(|t| (t, 1000 + u64::from(t))).collect();
    let mut trailing = entries(&[(4, 1 << 30), (77, 5), (4, u64::MAX)]);
    trailing.extend_from_slice(&[5, 0, 1]);
    vec![entries(&all), trailing]
}
