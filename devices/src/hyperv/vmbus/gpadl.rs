//! Guest page lists (GPADLs) assembled from GPADL_HEADER and GPADL_BODY.
//!
//! A GPADL names guest memory by handle. Its description is a byte stream of
//! `range_buflen` bytes: for each of `range_count` ranges a `u32 byte_count`,
//! a `u32 byte_offset` (into the first page) and one `u64` PFN per 4 KiB page
//! the range spans. GPADL_HEADER carries the start of the stream (bytes 20..
//! of the message), GPADL_BODY messages the rest (bytes 16..). Linux sends
//! one range with offset 0, 26 PFNs in the header and up to 28 per body
//! (`drivers/hv/channel.c: create_gpadl_header`); hv_balloon's 10-page ring
//! fits in the header alone.
//!
//! Host allocations are bounded: `range_buflen` is a `u16` (so one GPADL is at
//! most 64 KiB of description) and at most [`MAX_GPADLS`] exist at a time.

use std::collections::BTreeMap;

use super::message::{GpadlBody, GpadlHeader};
use super::HV_PAGE_SIZE;

/// Most GPADLs (complete or being assembled) the host keeps at a time. The
/// Dynamic Memory channel needs one.
pub const MAX_GPADLS: usize = 16;
/// Highest PFN accepted: guest physical addresses are at most 52 bits.
pub const MAX_GUEST_PFN: u64 = (1 << (52 - 12)) - 1;

/// Size of one PFN.
const PFN_SIZE: usize = 8;

/// One contiguous (in guest virtual terms) range of a GPADL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpaRange {
    /// Offset of the range's first byte in its first page (< 4096).
    pub byte_offset: u32,
    /// Length of the range in bytes (> 0).
    pub byte_count: u32,
    /// Guest PFNs (4 KiB pages) of the pages the range spans, in order.
    pub pfns: Vec<u64>,
}

/// A complete GPADL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpadl {
    /// Guest-chosen handle.
    pub id: u32,
    /// Channel named in GPADL_HEADER.
    pub child_relid: u32,
    /// The ranges, at least one.
    pub ranges: Vec<GpaRange>,
}

impl Gpadl {
    /// The PFNs if the GPADL is what a ring buffer needs: one range, starting
    /// at offset 0, a whole number of pages long.
    pub fn page_aligned_pfns(&self) -> Option<&[u64]> {
        match self.ranges.as_slice() {
            [range]
                if range.byte_offset == 0
                    && u64::from(range.byte_count) == range.pfns.len() as u64 * HV_PAGE_SIZE =>
            {
                Some(&range.pfns)
            }
            _ => None,
        }
    }
}

/// Why a GPADL message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GpadlError {
    /// The handle names a GPADL that already exists.
    #[error("GPADL handle is already in use")]
    DuplicateId,
    /// The host already holds [`MAX_GPADLS`] GPADLs.
    #[error("too many GPADLs: at most {MAX_GPADLS} at a time")]
    TooMany,
    /// `range_buflen` is not a non-zero multiple of 8.
    #[error("range_buflen {0} is not a non-zero multiple of 8")]
    BadRangeBufferLength(u16),
    /// `range_count` is 0.
    #[error("a GPADL needs at least one range")]
    NoRanges,
    /// A message carries range data whose length is not a multiple of 8.
    #[error("range data of {0} bytes is not a multiple of 8")]
    MisalignedData(usize),
    /// The messages carry more range data than `range_buflen`.
    #[error("range data overflows range_buflen {range_buflen}")]
    Overflow {
        /// Announced size of the range data.
        range_buflen: u16,
    },
    /// A range with zero length or an offset beyond its first page.
    #[error("range {index} has byte_offset {byte_offset} and byte_count {byte_count}")]
    BadRange {
        /// Index of the range.
        index: usize,
        /// Its byte offset.
        byte_offset: u32,
        /// Its byte count.
        byte_count: u32,
    },
    /// The ranges do not fill `range_buflen` exactly.
    #[error("the ranges' descriptors and PFNs do not add up to range_buflen")]
    LengthMismatch,
    /// A PFN beyond 52-bit guest physical addresses.
    #[error("PFN {0:#x} is beyond the guest physical address space")]
    BadPfn(u64),
    /// A GPADL_BODY for a handle that is not being assembled.
    #[error("no GPADL is being assembled under this handle")]
    UnknownId,
}

/// A refused GPADL message, with what the host needs to answer it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("GPADL {gpadl_id:#x}: {error}")]
pub struct GpadlFailure {
    /// Handle from the message.
    pub gpadl_id: u32,
    /// Relid to put in a failed GPADL_CREATED, or `None` when the guest is
    /// not waiting for one (a body for an unknown handle).
    pub reply_relid: Option<u32>,
    /// What was wrong.
    pub error: GpadlError,
}

/// Progress of a GPADL after a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpadlProgress {
    /// More GPADL_BODY messages are expected.
    Incomplete,
    /// The GPADL is complete: answer GPADL_CREATED with status 0.
    Complete {
        /// Relid from the header.
        child_relid: u32,
        /// Handle of the GPADL.
        gpadl_id: u32,
    },
}

#[derive(Debug)]
struct PendingGpadl {
    child_relid: u32,
    range_count: u16,
    range_buflen: u16,
    data: Vec<u8>,
}

#[derive(Debug)]
enum GpadlEntry {
    Pending(PendingGpadl),
    Complete(Gpadl),
}

/// The GPADLs of one VMBus connection, by handle.
#[derive(Debug, Default)]
pub struct GpadlTable {
    entries: BTreeMap<u32, GpadlEntry>,
}

impl GpadlTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a GPADL from its GPADL_HEADER; completes it at once if the
    /// header carries all the range data.
    pub fn on_header(&mut self, header: &GpadlHeader) -> Result<GpadlProgress, GpadlFailure> {
        let fail = |error| GpadlFailure {
            gpadl_id: header.gpadl_id,
            reply_relid: Some(header.child_relid),
            error,
        };
        if self.entries.contains_key(&header.gpadl_id) {
            return Err(fail(GpadlError::DuplicateId));
        }
        if self.entries.len() >= MAX_GPADLS {
            return Err(fail(GpadlError::TooMany));
        }
        if header.range_buflen == 0 || !usize::from(header.range_buflen).is_multiple_of(PFN_SIZE) {
            return Err(fail(GpadlError::BadRangeBufferLength(header.range_buflen)));
        }
        if header.range_count == 0 {
            return Err(fail(GpadlError::NoRanges));
        }
        let mut pending = PendingGpadl {
            child_relid: header.child_relid,
            range_count: header.range_count,
            range_buflen: header.range_buflen,
            data: Vec::with_capacity(usize::from(header.range_buflen)),
        };
        pending.append(&header.range_data).map_err(fail)?;
        self.settle(header.gpadl_id, pending).map_err(fail)
    }

    /// Adds the PFNs of a GPADL_BODY. A malformed body fails (and forgets)
    /// the whole GPADL.
    pub fn on_body(&mut self, body: &GpadlBody) -> Result<GpadlProgress, GpadlFailure> {
        let unknown = GpadlFailure {
            gpadl_id: body.gpadl_id,
            reply_relid: None,
            error: GpadlError::UnknownId,
        };
        // Only a GPADL being assembled takes a body; a complete one stays.
        let mut pending = match self.entries.remove(&body.gpadl_id) {
            Some(GpadlEntry::Pending(pending)) => pending,
            Some(complete) => {
                self.entries.insert(body.gpadl_id, complete);
                return Err(unknown);
            }
            None => return Err(unknown),
        };
        let reply_relid = Some(pending.child_relid);
        let fail = |error| GpadlFailure {
            gpadl_id: body.gpadl_id,
            reply_relid,
            error,
        };
        pending.append(&body.range_data).map_err(fail)?;
        self.settle(body.gpadl_id, pending).map_err(fail)
    }

    /// Stores a pending GPADL, or the finished GPADL if all data is in.
    fn settle(&mut self, id: u32, pending: PendingGpadl) -> Result<GpadlProgress, GpadlError> {
        if pending.data.len() < usize::from(pending.range_buflen) {
            self.entries.insert(id, GpadlEntry::Pending(pending));
            return Ok(GpadlProgress::Incomplete);
        }
        let ranges = parse_ranges(&pending.data, pending.range_count)?;
        let child_relid = pending.child_relid;
        self.entries.insert(
            id,
            GpadlEntry::Complete(Gpadl {
                id,
                child_relid,
                ranges,
            }),
        );
        Ok(GpadlProgress::Complete {
            child_relid,
            gpadl_id: id,
        })
    }

    /// The complete GPADL with this handle.
    pub fn get(&self, id: u32) -> Option<&Gpadl> {
        match self.entries.get(&id) {
            Some(GpadlEntry::Complete(gpadl)) => Some(gpadl),
            _ => None,
        }
    }

    /// Forgets a GPADL, complete or not; returns whether it existed.
    pub fn remove(&mut self, id: u32) -> bool {
        self.entries.remove(&id).is_some()
    }

    /// Forgets every GPADL (connection reset).
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Number of GPADLs, complete or being assembled.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no GPADLs.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl PendingGpadl {
    fn append(&mut self, data: &[u8]) -> Result<(), GpadlError> {
        if !data.len().is_multiple_of(PFN_SIZE) {
            return Err(GpadlError::MisalignedData(data.len()));
        }
        let room = usize::from(self.range_buflen).saturating_sub(self.data.len());
        if data.len() > room {
            return Err(GpadlError::Overflow {
                range_buflen: self.range_buflen,
            });
        }
        self.data.extend_from_slice(data);
        Ok(())
    }
}

/// Decodes `range_count` ranges that must fill `data` exactly.
fn parse_ranges(data: &[u8], range_count: u16) -> Result<Vec<GpaRange>, GpadlError> {
    let mut words = data.chunks_exact(PFN_SIZE).map(|chunk| {
        let mut word = [0u8; PFN_SIZE];
        word.copy_from_slice(chunk);
        word
    });
    let mut ranges = Vec::new();
    for index in 0..usize::from(range_count) {
        let [c0, c1, c2, c3, o0, o1, o2, o3] = words.next().ok_or(GpadlError::LengthMismatch)?;
        let byte_count = u32::from_le_bytes([c0, c1, c2, c3]);
        let byte_offset = u32::from_le_bytes([o0, o1, o2, o3]);
        if byte_count == 0 || u64::from(byte_offset) >= HV_PAGE_SIZE {
            return Err(GpadlError::BadRange {
                index,
                byte_offset,
                byte_count,
            });
        }
        let pages = (u64::from(byte_offset) + u64::from(byte_count)).div_ceil(HV_PAGE_SIZE);
        // The data bounds `pages`: a longer claim runs out of words below.
        let mut pfns = Vec::new();
        for _ in 0..pages {
            let pfn = u64::from_le_bytes(words.next().ok_or(GpadlError::LengthMismatch)?);
            if pfn > MAX_GUEST_PFN {
                return Err(GpadlError::BadPfn(pfn));
            }
            pfns.push(pfn);
        }
        ranges.push(GpaRange {
            byte_offset,
            byte_count,
            pfns,
        });
    }
    if words.next().is_some() {
        return Err(GpadlError::LengthMismatch);
    }
    Ok(ranges)
}

#[cfg(test)]
#[path = "gpadl_tests.rs"]
mod tests;
