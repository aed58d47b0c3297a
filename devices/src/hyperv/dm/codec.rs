//! Parsing and encoding of DM messages over byte slices.
//!
//! [`parse_guest_message`] decodes what the guest sends and
//! [`HostDmMessage::encode`] produces what the host sends, in the exact
//! layouts of Linux's `hv_balloon.c`. The opposite directions
//! ([`GuestDmMessage::encode`], [`parse_host_message`]) serve guest models
//! in tests and round-trip fuzzing. Nothing here panics on guest data:
//! every read is bounds checked and allocation is bounded by the input
//! length.

use super::message::*;
use super::ranges::PageRange;

/// Offset of the range array in BALLOON_RESPONSE and UNBALLOON_REQUEST.
const RANGES_OFFSET: usize = 16;

fn u16_at(b: &[u8], at: usize) -> u16 {
    let mut v = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        v.copy_from_slice(s);
    }
    u16::from_le_bytes(v)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        v.copy_from_slice(s);
    }
    u32::from_le_bytes(v)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        v.copy_from_slice(s);
    }
    u64::from_le_bytes(v)
}

/// Decodes the header of `bytes` without looking at the body.
pub fn parse_header(bytes: &[u8]) -> Result<DmHeader, DmError> {
    if bytes.len() < DM_HEADER_SIZE {
        return Err(DmError::TooShortForHeader(bytes.len()));
    }
    Ok(DmHeader {
        msg_type: u16_at(bytes, 0),
        size: u16_at(bytes, 2),
        trans_id: u32_at(bytes, 4),
    })
}

/// The header, and the message cut to the header's size (trailing bytes,
/// e.g. VMBus packet padding, are ignored).
fn frame(bytes: &[u8]) -> Result<(DmHeader, &[u8]), DmError> {
    let header = parse_header(bytes)?;
    let body = bytes
        .get(..usize::from(header.size))
        .filter(|b| b.len() >= DM_HEADER_SIZE)
        .ok_or(DmError::BadSize {
            declared: header.size,
            available: bytes.len(),
        })?;
    Ok((header, body))
}

fn need(header: &DmHeader, msg: &[u8], needed: usize) -> Result<(), DmError> {
    if msg.len() < needed {
        return Err(DmError::Truncated {
            msg_type: header.msg_type,
            size: header.size,
            needed,
        });
    }
    Ok(())
}

/// Reads `count` ranges from offset 16, checking they fit the message.
fn ranges_at(header: &DmHeader, msg: &[u8], count: u32) -> Result<Vec<PageRange>, DmError> {
    let fits = msg.len().saturating_sub(RANGES_OFFSET) / RANGE_SIZE;
    let n =
        usize::try_from(count)
            .ok()
            .filter(|&n| n <= fits)
            .ok_or(DmError::RangeCountTooLarge {
                count,
                size: header.size,
                fits,
            })?;
    Ok((0..n)
        .map(|i| decode_range(u64_at(msg, RANGES_OFFSET + i * RANGE_SIZE)))
        .collect())
}

/// Decodes a message the guest sent. Never panics; allocation is bounded
/// by the length of `bytes`.
pub fn parse_guest_message(bytes: &[u8]) -> Result<GuestDmMessage, DmError> {
    let (h, m) = frame(bytes)?;
    match h.msg_type {
        DM_VERSION_REQUEST => {
            need(&h, m, 16)?;
            Ok(GuestDmMessage::VersionRequest {
                version: DmVersion(u32_at(m, 8)),
                is_last_attempt: u32_at(m, 12) & 1 != 0,
            })
        }
        DM_CAPABILITIES_REPORT => {
            need(&h, m, 32)?;
            Ok(GuestDmMessage::CapabilitiesReport {
                caps: GuestCapabilities::from_bits(u64_at(m, 8)),
                min_page_count: u64_at(m, 16),
                max_page_number: u64_at(m, 24),
            })
        }
        DM_STATUS_REPORT => {
            need(&h, m, 48)?;
            Ok(GuestDmMessage::StatusReport(StatusReport {
                num_avail: u64_at(m, 8),
                num_committed: u64_at(m, 16),
                page_file_size: u64_at(m, 24),
                zero_free: u64_at(m, 32),
                page_file_writes: u32_at(m, 40),
                io_diff: u32_at(m, 44),
            }))
        }
        DM_BALLOON_RESPONSE => {
            need(&h, m, RANGES_OFFSET)?;
            let word = u32_at(m, 12);
            Ok(GuestDmMessage::BalloonResponse {
                more_pages: word & 1 != 0,
                ranges: ranges_at(&h, m, word >> 1)?,
            })
        }
        DM_UNBALLOON_RESPONSE => Ok(GuestDmMessage::UnballoonResponse),
        DM_MEM_HOT_ADD_RESPONSE => {
            need(&h, m, 16)?;
            Ok(GuestDmMessage::HotAddResponse {
                page_count: u32_at(m, 8),
                result: u32_at(m, 12),
            })
        }
        DM_ERROR
        | DM_VERSION_RESPONSE
        | DM_CAPABILITIES_RESPONSE
        | DM_BALLOON_REQUEST
        | DM_UNBALLOON_REQUEST
        | DM_MEM_HOT_ADD_REQUEST
        | DM_INFO_MESSAGE => Err(DmError::WrongDirection(h.msg_type)),
        other => Err(DmError::UnknownType(other)),
    }
}

/// Decodes a message the host sent (for guest models and fuzzing).
pub fn parse_host_message(bytes: &[u8]) -> Result<HostDmMessage, DmError> {
    let (h, m) = frame(bytes)?;
    match h.msg_type {
        DM_VERSION_RESPONSE | DM_CAPABILITIES_RESPONSE => {
            need(&h, m, 16)?;
            let accepted = u64_at(m, 8) & 1 != 0;
            Ok(if h.msg_type == DM_VERSION_RESPONSE {
                HostDmMessage::VersionResponse { accepted }
            } else {
                HostDmMessage::CapabilitiesResponse { accepted }
            })
        }
        DM_BALLOON_REQUEST => {
            need(&h, m, 16)?;
            Ok(HostDmMessage::BalloonRequest {
                num_pages: u32_at(m, 8),
            })
        }
        DM_UNBALLOON_REQUEST => {
            need(&h, m, RANGES_OFFSET)?;
            Ok(HostDmMessage::UnballoonRequest {
                more_pages: u32_at(m, 8) & 1 != 0,
                ranges: ranges_at(&h, m, u32_at(m, 12))?,
            })
        }
        DM_MEM_HOT_ADD_REQUEST => {
            need(&h, m, 16)?;
            // Linux: exactly 16 bytes is the plain form, anything else
            // carries a region.
            let region = if m.len() == 16 {
                None
            } else {
                need(&h, m, 24)?;
                Some(decode_range(u64_at(m, 16)))
            };
            Ok(HostDmMessage::HotAddRequest {
                range: decode_range(u64_at(m, 8)),
                region,
            })
        }
        DM_INFO_MESSAGE => {
            need(&h, m, 32)?;
            Ok(HostDmMessage::InfoMaxPageCount {
                max_page_count: u64_at(m, 24),
            })
        }
        DM_ERROR
        | DM_VERSION_REQUEST
        | DM_CAPABILITIES_REPORT
        | DM_STATUS_REPORT
        | DM_BALLOON_RESPONSE
        | DM_UNBALLOON_RESPONSE
        | DM_MEM_HOT_ADD_RESPONSE => Err(DmError::WrongDirection(h.msg_type)),
        other => Err(DmError::UnknownType(other)),
    }
}

/// Builds a message: header, then body fields appended in order.
struct Builder(Vec<u8>);

impl Builder {
    fn new(msg_type: u16, trans_id: u32) -> Self {
        let mut b = Vec::with_capacity(32);
        b.extend_from_slice(&msg_type.to_le_bytes());
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&trans_id.to_le_bytes());
        Self(b)
    }

    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    fn ranges(mut self, ranges: &[PageRange]) -> Result<Self, DmError> {
        for &r in ranges {
            self = self.u64(encode_range(r)?);
        }
        Ok(self)
    }

    fn finish(mut self, limit: usize) -> Result<Vec<u8>, DmError> {
        let size = self.0.len();
        let too_large = DmError::MessageTooLarge { size, limit };
        if size > limit {
            return Err(too_large);
        }
        let size16 = u16::try_from(size).map_err(|_| too_large)?;
        self.0[2..4].copy_from_slice(&size16.to_le_bytes());
        Ok(self.0)
    }
}

fn count_u32(ranges: &[PageRange]) -> Result<u32, DmError> {
    u32::try_from(ranges.len()).map_err(|_| DmError::MessageTooLarge {
        size: usize::MAX,
        limit: MAX_HOST_MESSAGE_SIZE,
    })
}

impl HostDmMessage {
    /// The exact Linux layout of the message; fails if a range does not fit
    /// the wire format or the message exceeds [`MAX_HOST_MESSAGE_SIZE`].
    pub fn encode(&self, trans_id: u32) -> Result<Vec<u8>, DmError> {
        let b = match self {
            Self::VersionResponse { accepted } => {
                Builder::new(DM_VERSION_RESPONSE, trans_id).u64(u64::from(*accepted))
            }
            Self::CapabilitiesResponse { accepted } => {
                Builder::new(DM_CAPABILITIES_RESPONSE, trans_id).u64(u64::from(*accepted))
            }
            Self::BalloonRequest { num_pages } => Builder::new(DM_BALLOON_REQUEST, trans_id)
                .u32(*num_pages)
                .u32(0),
            Self::UnballoonRequest { more_pages, ranges } => {
                Builder::new(DM_UNBALLOON_REQUEST, trans_id)
                    .u32(u32::from(*more_pages))
                    .u32(count_u32(ranges)?)
                    .ranges(ranges)?
            }
            Self::HotAddRequest { range, region } => {
                let b = Builder::new(DM_MEM_HOT_ADD_REQUEST, trans_id).ranges(&[*range])?;
                match region {
                    Some(region) => b.ranges(&[*region])?,
                    None => b,
                }
            }
            Self::InfoMaxPageCount { max_page_count } => Builder::new(DM_INFO_MESSAGE, trans_id)
                .u32(0)
                .u32(16)
                .u32(INFO_TYPE_MAX_PAGE_COUNT)
                .u32(8)
                .u64(*max_page_count),
        };
        b.finish(MAX_HOST_MESSAGE_SIZE)
    }
}

impl GuestDmMessage {
    /// The layout Linux sends (for guest models and fuzz seeds); fails if a
    /// range does not fit the wire format or the size exceeds `u16`.
    pub fn encode(&self, trans_id: u32) -> Result<Vec<u8>, DmError> {
        let b = match self {
            Self::VersionRequest {
                version,
                is_last_attempt,
            } => Builder::new(DM_VERSION_REQUEST, trans_id)
                .u32(version.0)
                .u32(u32::from(*is_last_attempt)),
            Self::CapabilitiesReport {
                caps,
                min_page_count,
                max_page_number,
            } => Builder::new(DM_CAPABILITIES_REPORT, trans_id)
                .u64(caps.to_bits())
                .u64(*min_page_count)
                .u64(*max_page_number),
            Self::StatusReport(s) => Builder::new(DM_STATUS_REPORT, trans_id)
                .u64(s.num_avail)
                .u64(s.num_committed)
                .u64(s.page_file_size)
                .u64(s.zero_free)
                .u32(s.page_file_writes)
                .u32(s.io_diff),
            Self::BalloonResponse { more_pages, ranges } => {
                let word = count_u32(ranges)?
                    .checked_mul(2)
                    .ok_or(DmError::MessageTooLarge {
                        size: usize::MAX,
                        limit: usize::from(u16::MAX),
                    })?;
                Builder::new(DM_BALLOON_RESPONSE, trans_id)
                    .u32(0)
                    .u32(word | u32::from(*more_pages))
                    .ranges(ranges)?
            }
            Self::UnballoonResponse => Builder::new(DM_UNBALLOON_RESPONSE, trans_id),
            Self::HotAddResponse { page_count, result } => {
                Builder::new(DM_MEM_HOT_ADD_RESPONSE, trans_id)
                    .u32(*page_count)
                    .u32(*result)
            }
        };
        b.finish(usize::from(u16::MAX))
    }
}

/// Cuts `ranges` into UNBALLOON_REQUESTs that each fit the guest's receive
/// buffer: ranges longer than [`MAX_RANGE_PAGES`] are split, at most
/// [`MAX_RANGES_PER_MESSAGE`] ranges go in one message, and `more_pages`
/// is set on all messages but the last. Empty ranges are dropped; no
/// ranges give no message.
pub fn split_unballoon(ranges: &[PageRange]) -> Vec<HostDmMessage> {
    let mut pieces = Vec::new();
    for r in ranges {
        let mut start = r.start;
        let mut left = r.end() - r.start;
        while left > 0 {
            let count = left.min(MAX_RANGE_PAGES);
            pieces.push(PageRange::new(start, count));
            start += count;
            left -= count;
        }
    }
    let chunks: Vec<&[PageRange]> = pieces.chunks(MAX_RANGES_PER_MESSAGE).collect();
    let last = chunks.len().saturating_sub(1);
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, chunk)| HostDmMessage::UnballoonRequest {
            more_pages: i != last,
            ranges: chunk.to_vec(),
        })
        .collect()
}

#[cfg(test)]
mod tests;
