//! Dynamic Memory messages: the wire layouts of Linux's `hv_balloon`.
//!
//! Every message starts with an 8-byte header (`u16 type`, `u16 size` of the
//! whole message, `u32 trans_id`), little endian. Page ranges are one `u64`
//! each: bits 0-39 the start PFN, bits 40-63 the page count, in 4 KiB pages.
//!
//! This module holds the message types; [`super::codec`] turns them into
//! bytes and back.
//!
//! The guest receives into a 4096-byte buffer: a longer host message is
//! never consumed and livelocks the channel, so host encoders refuse to
//! produce one, and [`super::codec::split_unballoon`] cuts long range lists
//! into several messages.

use super::ranges::PageRange;

/// Size of the message header.
pub const DM_HEADER_SIZE: usize = 8;
/// Largest host message the guest can receive (its receive buffer).
pub const MAX_HOST_MESSAGE_SIZE: usize = 4096;
/// Size of one page range on the wire.
pub const RANGE_SIZE: usize = 8;
/// Most ranges one message of [`MAX_HOST_MESSAGE_SIZE`] bytes holds (510:
/// the range array starts at offset 16).
pub const MAX_RANGES_PER_MESSAGE: usize = (MAX_HOST_MESSAGE_SIZE - 16) / RANGE_SIZE;
/// Most pages one range can describe (24-bit count).
pub const MAX_RANGE_PAGES: u64 = (1 << 24) - 1;
/// First page frame number a range cannot start at (40-bit PFN).
pub const PFN_LIMIT: u64 = 1 << 40;

/// `DM_ERROR`.
pub const DM_ERROR: u16 = 0;
/// `DM_VERSION_REQUEST` (guest → host).
pub const DM_VERSION_REQUEST: u16 = 1;
/// `DM_VERSION_RESPONSE` (host → guest).
pub const DM_VERSION_RESPONSE: u16 = 2;
/// `DM_CAPABILITIES_REPORT` (guest → host).
pub const DM_CAPABILITIES_REPORT: u16 = 3;
/// `DM_CAPABILITIES_RESPONSE` (host → guest).
pub const DM_CAPABILITIES_RESPONSE: u16 = 4;
/// `DM_STATUS_REPORT` (guest → host).
pub const DM_STATUS_REPORT: u16 = 5;
/// `DM_BALLOON_REQUEST` (host → guest).
pub const DM_BALLOON_REQUEST: u16 = 6;
/// `DM_BALLOON_RESPONSE` (guest → host).
pub const DM_BALLOON_RESPONSE: u16 = 7;
/// `DM_UNBALLOON_REQUEST` (host → guest).
pub const DM_UNBALLOON_REQUEST: u16 = 8;
/// `DM_UNBALLOON_RESPONSE` (guest → host).
pub const DM_UNBALLOON_RESPONSE: u16 = 9;
/// `DM_MEM_HOT_ADD_REQUEST` (host → guest).
pub const DM_MEM_HOT_ADD_REQUEST: u16 = 10;
/// `DM_MEM_HOT_ADD_RESPONSE` (guest → host).
pub const DM_MEM_HOT_ADD_RESPONSE: u16 = 11;
/// `DM_INFO_MESSAGE` (host → guest, protocol 1.0 and later).
pub const DM_INFO_MESSAGE: u16 = 12;

/// `INFO_TYPE_MAX_PAGE_CNT`: the info blob is the maximum page count.
pub const INFO_TYPE_MAX_PAGE_COUNT: u32 = 0;

/// A protocol version, `major << 16 | minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DmVersion(pub u32);

impl DmVersion {
    /// Version 0.3 (Windows 7 hosts).
    pub const V0_3: Self = Self(0x0000_0003);
    /// Version 1.0 (Windows 8 hosts; adds INFO_MESSAGE).
    pub const V1_0: Self = Self(0x0001_0000);
    /// Version 2.0 (Windows 10 hosts), the one Linux asks for first.
    pub const V2_0: Self = Self(0x0002_0000);

    /// Major version.
    pub const fn major(self) -> u16 {
        (self.0 >> 16) as u16
    }

    /// Minor version.
    pub const fn minor(self) -> u16 {
        (self.0 & 0xffff) as u16
    }
}

impl std::fmt::Display for DmVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major(), self.minor())
    }
}

/// Why bytes are not a valid DM message, or a message cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DmError {
    /// Fewer bytes than the header.
    #[error("DM message is {0} bytes long, shorter than its 8-byte header")]
    TooShortForHeader(usize),
    /// The header's size is below the header size or beyond the bytes
    /// received.
    #[error("DM header declares {declared} bytes but {available} were received")]
    BadSize {
        /// The header's `size` field.
        declared: u16,
        /// Bytes received.
        available: usize,
    },
    /// The message is shorter than the fixed layout of its type.
    #[error("DM message type {msg_type} is {size} bytes, its layout needs {needed}")]
    Truncated {
        /// Message type.
        msg_type: u16,
        /// The header's `size` field.
        size: u16,
        /// Bytes the layout needs.
        needed: usize,
    },
    /// A range count larger than the message holds.
    #[error("DM message declares {count} ranges but its {size} bytes hold {fits}")]
    RangeCountTooLarge {
        /// Declared range count.
        count: u32,
        /// The header's `size` field.
        size: u16,
        /// Ranges that fit in the message.
        fits: usize,
    },
    /// A message type that only the other side sends.
    #[error("DM message type {0} is not sent in this direction")]
    WrongDirection(u16),
    /// A message type that does not exist.
    #[error("unknown DM message type {0}")]
    UnknownType(u16),
    /// The range does not fit the 40-bit PFN / 24-bit count wire format.
    #[error("page range {start:#x}+{count:#x} does not fit a 40-bit PFN and a 24-bit count")]
    RangeNotEncodable {
        /// Start PFN.
        start: u64,
        /// Page count.
        count: u64,
    },
    /// The encoded message would exceed its size limit.
    #[error("DM message of {size} bytes exceeds the {limit}-byte limit")]
    MessageTooLarge {
        /// Encoded size.
        size: usize,
        /// Limit for this direction.
        limit: usize,
    },
}

/// The message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmHeader {
    /// Message type.
    pub msg_type: u16,
    /// Size of the whole message in bytes.
    pub size: u16,
    /// Transaction id (each side uses its own counter; never matched).
    pub trans_id: u32,
}

/// What the guest reports in CAPABILITIES_REPORT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestCapabilities {
    /// The guest can balloon (bit 0).
    pub balloon: bool,
    /// The guest can hot-add memory (bit 1).
    pub hot_add: bool,
    /// Hot-add alignment: log2 of the block size in MiB (bits 2-5).
    pub hot_add_alignment: u8,
}

impl GuestCapabilities {
    /// Decodes the caps word (reserved bits ignored).
    pub const fn from_bits(bits: u64) -> Self {
        Self {
            balloon: bits & 1 != 0,
            hot_add: bits & 2 != 0,
            hot_add_alignment: ((bits >> 2) & 0xf) as u8,
        }
    }

    /// Encodes the caps word.
    pub const fn to_bits(self) -> u64 {
        (self.balloon as u64)
            | (self.hot_add as u64) << 1
            | ((self.hot_add_alignment & 0xf) as u64) << 2
    }

    /// The hot-add alignment in 4 KiB pages (256 × 2^alignment).
    pub const fn hot_add_alignment_pages(self) -> u64 {
        256 << (self.hot_add_alignment & 0xf)
    }
}

/// The guest's memory pressure report (all counts in 4 KiB pages).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatusReport {
    /// Available memory (Linux: MemAvailable).
    pub num_avail: u64,
    /// Committed memory (Linux: Committed_AS + ballooned + hot-added but
    /// offline + balloon floor).
    pub num_committed: u64,
    /// Page file size (0 from Linux).
    pub page_file_size: u64,
    /// Zero and free pages (0 from Linux).
    pub zero_free: u64,
    /// Page file writes (0 from Linux).
    pub page_file_writes: u32,
    /// File cache indicator (0 from Linux).
    pub io_diff: u32,
}

/// A message the guest sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestDmMessage {
    /// VERSION_REQUEST: the guest proposes a protocol version.
    VersionRequest {
        /// Proposed version.
        version: DmVersion,
        /// The guest will not propose another version.
        is_last_attempt: bool,
    },
    /// CAPABILITIES_REPORT.
    CapabilitiesReport {
        /// The capability bits.
        caps: GuestCapabilities,
        /// Minimum page count (0 from Linux).
        min_page_count: u64,
        /// Highest page number (all ones from Linux).
        max_page_number: u64,
    },
    /// STATUS_REPORT.
    StatusReport(StatusReport),
    /// BALLOON_RESPONSE: pages the guest gave up.
    BalloonResponse {
        /// More responses follow for the same request.
        more_pages: bool,
        /// The pages given up.
        ranges: Vec<PageRange>,
    },
    /// UNBALLOON_RESPONSE: the guest took back the pages of the request(s).
    UnballoonResponse,
    /// MEM_HOT_ADD_RESPONSE.
    HotAddResponse {
        /// Pages now backed in the guest.
        page_count: u32,
        /// 1 success, 0 failure (see the protocol module for the meaning
        /// together with `page_count`).
        result: u32,
    },
}

/// A message the host sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostDmMessage {
    /// VERSION_RESPONSE.
    VersionResponse {
        /// The proposed version is accepted.
        accepted: bool,
    },
    /// CAPABILITIES_RESPONSE.
    CapabilitiesResponse {
        /// The capabilities are accepted (the guest fails probe otherwise).
        accepted: bool,
    },
    /// BALLOON_REQUEST: give `num_pages` pages back.
    BalloonRequest {
        /// Pages to give back.
        num_pages: u32,
    },
    /// UNBALLOON_REQUEST: take these pages back (the guest trusts them
    /// blindly).
    UnballoonRequest {
        /// More requests follow; the guest answers only the last one.
        more_pages: bool,
        /// The pages returned.
        ranges: Vec<PageRange>,
    },
    /// MEM_HOT_ADD_REQUEST: 16 bytes without `region`, 24 bytes with it
    /// (the guest tells the forms apart only by the size).
    HotAddRequest {
        /// Pages to add.
        range: PageRange,
        /// The hot-add region to create first.
        region: Option<PageRange>,
    },
    /// INFO_MESSAGE of type 0: the maximum dynamic page count.
    InfoMaxPageCount {
        /// Maximum page count.
        max_page_count: u64,
    },
}

/// Decodes a wire range.
pub const fn decode_range(raw: u64) -> PageRange {
    PageRange::new(raw & (PFN_LIMIT - 1), raw >> 40)
}

/// Encodes a range; fails if it does not fit the wire format.
pub fn encode_range(range: PageRange) -> Result<u64, DmError> {
    if range.start >= PFN_LIMIT || range.count > MAX_RANGE_PAGES {
        return Err(DmError::RangeNotEncodable {
            start: range.start,
            count: range.count,
        });
    }
    Ok(range.start | range.count << 40)
}
