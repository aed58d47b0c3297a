//! Hyper-V GUIDs as they travel in VMBus messages.
//!
//! A GUID `aabbccdd-eeff-gghh-iijj-kkllmmnnoopp` is stored the Windows way:
//! the first three fields little-endian, the last eight bytes as written.
//! The Dynamic Memory class GUID `525074dc-8985-46e2-8057-a307dc18a502` is
//! therefore the bytes `dc 74 50 52 85 89 e2 46 80 57 a3 07 dc 18 a5 02`,
//! which is also what `hv_balloon`'s module alias spells.

use std::fmt;

/// A GUID in the mixed-endian byte order of VMBus offers.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Guid {
    bytes: [u8; 16],
}

/// Why a string is not a GUID of the form `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a GUID: expected 8-4-4-4-12 hexadecimal digits, like 525074dc-8985-46e2-8057-a307dc18a502")]
pub struct GuidParseError(pub String);

impl Guid {
    /// The GUID with the given fields, in the order they are written.
    pub const fn from_fields(data1: u32, data2: u16, data3: u16, data4: [u8; 8]) -> Self {
        let d1 = data1.to_le_bytes();
        let d2 = data2.to_le_bytes();
        let d3 = data3.to_le_bytes();
        Self {
            bytes: [
                d1[0], d1[1], d1[2], d1[3], d2[0], d2[1], d3[0], d3[1], data4[0], data4[1],
                data4[2], data4[3], data4[4], data4[5], data4[6], data4[7],
            ],
        }
    }

    /// The GUID whose wire bytes (mixed-endian) are `bytes`.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self { bytes }
    }

    /// The wire bytes (mixed-endian) of the GUID.
    pub const fn to_bytes(self) -> [u8; 16] {
        self.bytes
    }

    /// Parses the textual form `525074dc-8985-46e2-8057-a307dc18a502`
    /// (either case).
    pub fn parse(text: &str) -> Result<Self, GuidParseError> {
        let error = || GuidParseError(text.to_string());
        let groups: Vec<&str> = text.split('-').collect();
        let lengths: Vec<usize> = groups.iter().map(|group| group.len()).collect();
        if lengths != [8, 4, 4, 4, 12] || !text.chars().all(|c| c == '-' || c.is_ascii_hexdigit()) {
            return Err(error());
        }
        let hex = |s: &str| u64::from_str_radix(s, 16).map_err(|_| error());
        let data1 = u32::try_from(hex(groups[0])?).map_err(|_| error())?;
        let data2 = u16::try_from(hex(groups[1])?).map_err(|_| error())?;
        let data3 = u16::try_from(hex(groups[2])?).map_err(|_| error())?;
        // The last 8 bytes: 2 from the fourth group, 6 from the fifth,
        // big-endian as written.
        let tail = (hex(groups[3])? << 48) | hex(groups[4])?;
        Ok(Self::from_fields(data1, data2, data3, tail.to_be_bytes()))
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a0, a1, a2, a3, b0, b1, c0, c1, tail @ ..] = self.bytes;
        let tail = u64::from_be_bytes(tail);
        write!(
            f,
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            u32::from_le_bytes([a0, a1, a2, a3]),
            u16::from_le_bytes([b0, b1]),
            u16::from_le_bytes([c0, c1]),
            tail >> 48,
            tail & 0xffff_ffff_ffff
        )
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Guid({self})")
    }
}

/// Class (interface type) of the Dynamic Memory device,
/// `525074dc-8985-46e2-8057-a307dc18a502` (Linux `HV_DM_GUID`).
pub const DYNAMIC_MEMORY_CLASS_ID: Guid = Guid::from_fields(
    0x5250_74dc,
    0x8985,
    0x46e2,
    [0x80, 0x57, 0xa3, 0x07, 0xdc, 0x18, 0xa5, 0x02],
);

/// Instance id of tidevm's one Dynamic Memory device,
/// `20fa5806-4a8a-46b5-9673-715368067014`. Fixed so that the guest's
/// `/sys/bus/vmbus/devices/<instance>` name is the same on every boot.
pub const DYNAMIC_MEMORY_INSTANCE_ID: Guid = Guid::from_fields(
    0x20fa_5806,
    0x4a8a,
    0x46b5,
    [0x96, 0x73, 0x71, 0x53, 0x68, 0x06, 0x70, 0x14],
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dm_class_id_has_the_mixed_endian_bytes_linux_matches() {
        assert_eq!(
            DYNAMIC_MEMORY_CLASS_ID.to_bytes(),
            [
                0xdc, 0x74, 0x50, 0x52, 0x85, 0x89, 0xe2, 0x46, 0x80, 0x57, 0xa3, 0x07, 0xdc, 0x18,
                0xa5, 0x02
            ]
        );
        assert_eq!(
            DYNAMIC_MEMORY_CLASS_ID.to_string(),
            "525074dc-8985-46e2-8057-a307dc18a502"
        );
    }

    #[test]
    fn parse_and_display_round_trip() {
        for text in [
            "525074dc-8985-46e2-8057-a307dc18a502",
            "20fa5806-4a8a-46b5-9673-715368067014",
            "00000000-0000-0000-0000-000000000000",
            "ffffffff-ffff-ffff-ffff-ffffffffffff",
        ] {
            assert_eq!(Guid::parse(text).unwrap().to_string(), text);
        }
        assert_eq!(
            Guid::parse("525074DC-8985-46E2-8057-A307DC18A502").unwrap(),
            DYNAMIC_MEMORY_CLASS_ID
        );
        assert_eq!(
            Guid::parse("20fa5806-4a8a-46b5-9673-715368067014").unwrap(),
            DYNAMIC_MEMORY_INSTANCE_ID
        );
        assert_eq!(
            Guid::from_bytes(DYNAMIC_MEMORY_CLASS_ID.to_bytes()),
            DYNAMIC_MEMORY_CLASS_ID
        );
    }

    #[test]
    fn parse_rejects_malformed_text() {
        for text in [
            "",
            "525074dc898546e28057a307dc18a502",
            "525074dc-8985-46e2-8057-a307dc18a50",
            "525074dc-8985-46e2-8057-a307dc18a5022",
            "525074dc-8985-46e2-8057a307-dc18a502",
            "+25074dc-8985-46e2-8057-a307dc18a502",
            "525074dg-8985-46e2-8057-a307dc18a502",
            "525074dc-8985-46e2-8057-a307dc18a5€",
        ] {
            assert!(Guid::parse(text).is_err(), "{text}");
        }
    }
}
