//! Parsing of virtio-blk requests (virtio 1.2, 5.2.6).
//!
//! A request is a descriptor chain: a device-readable header (type, reserved,
//! sector: 16 bytes) in the first descriptor, data descriptors, and a
//! device-writable status byte in the last descriptor. Parsing is pure: it
//! reads the header from guest memory and checks every guest-provided length
//! and address, but performs no I/O.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

/// Bytes in a sector, the unit of virtio-blk offsets and capacity.
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;
/// Size of the request header (`struct virtio_blk_outhdr`).
pub const REQUEST_HEADER_SIZE: u32 = 16;

/// What a request asks the device to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// Read sectors into the data buffers (`VIRTIO_BLK_T_IN`).
    In,
    /// Write the data buffers to sectors (`VIRTIO_BLK_T_OUT`).
    Out,
    /// Make previous writes durable (`VIRTIO_BLK_T_FLUSH`).
    Flush,
    /// Return the device serial (`VIRTIO_BLK_T_GET_ID`).
    GetId,
    /// Any other request type, answered with `VIRTIO_BLK_S_UNSUPP`.
    Unsupported(u32),
}

impl RequestKind {
    /// The kind of the request type `value` from the header.
    pub fn from_type(value: u32) -> Self {
        match value {
            VIRTIO_BLK_T_IN => Self::In,
            VIRTIO_BLK_T_OUT => Self::Out,
            VIRTIO_BLK_T_FLUSH => Self::Flush,
            VIRTIO_BLK_T_GET_ID => Self::GetId,
            other => Self::Unsupported(other),
        }
    }
}

/// A validated virtio-blk request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockRequest {
    /// The operation.
    pub kind: RequestKind,
    /// First sector (In/Out only; 0 otherwise).
    pub sector: u64,
    /// Guest buffers, in order; all inside guest memory, none empty. Empty
    /// for Flush and Unsupported.
    pub data: Vec<(GuestAddress, u32)>,
    /// Where the status byte goes (inside guest memory).
    pub status_addr: GuestAddress,
}

impl BlockRequest {
    /// Total bytes of the data buffers.
    pub fn data_len(&self) -> u64 {
        self.data.iter().map(|(_, len)| u64::from(*len)).sum()
    }

    /// Parses the descriptors of one chain (pure apart from reading the
    /// header from `mem`). `capacity` is the disk size in sectors.
    pub fn parse<M: GuestMemory + ?Sized>(
        descs: &[Descriptor],
        mem: &M,
        capacity: u64,
    ) -> Result<Self, InvalidRequest> {
        let (header, rest) = descs.split_first().ok_or(InvalidRequest {
            error: RequestError::EmptyChain,
            status_addr: None,
        })?;
        let (status, data) = rest.split_last().ok_or(InvalidRequest {
            error: RequestError::NoStatusDescriptor,
            status_addr: None,
        })?;
        let status_addr = check_status(status, mem).map_err(|error| InvalidRequest {
            error,
            status_addr: None,
        })?;
        let fail = |error| InvalidRequest {
            error,
            status_addr: Some(status_addr),
        };

        let (kind, sector) = read_header(header, mem).map_err(fail)?;
        let request = |data: Vec<(GuestAddress, u32)>, sector: u64| BlockRequest {
            kind,
            sector,
            data,
            status_addr,
        };
        match kind {
            RequestKind::Flush | RequestKind::Unsupported(_) => Ok(request(Vec::new(), 0)),
            RequestKind::GetId => {
                let buffers = check_data(data, true, mem).map_err(fail)?;
                if buffers.is_empty() {
                    return Err(fail(RequestError::NoData));
                }
                Ok(request(buffers, 0))
            }
            RequestKind::In | RequestKind::Out => {
                let buffers = check_data(data, kind == RequestKind::In, mem).map_err(fail)?;
                let len: u64 = buffers.iter().map(|(_, l)| u64::from(*l)).sum();
                if len == 0 {
                    return Err(fail(RequestError::NoData));
                }
                if !len.is_multiple_of(SECTOR_SIZE) {
                    return Err(fail(RequestError::UnalignedLength(len)));
                }
                let sectors = len >> SECTOR_SHIFT;
                match sector.checked_add(sectors) {
                    Some(end) if end <= capacity => Ok(request(buffers, sector)),
                    _ => Err(fail(RequestError::OutOfRange {
                        sector,
                        sectors,
                        capacity,
                    })),
                }
            }
        }
    }

    /// Parses a descriptor chain popped from a queue (see [`Self::parse`]).
    /// The chain's own iterator bounds its length by the queue size and
    /// stops at descriptors outside the table.
    pub fn parse_chain<M>(
        mut chain: DescriptorChain<M>,
        capacity: u64,
    ) -> Result<Self, InvalidRequest>
    where
        M: std::ops::Deref,
        M::Target: GuestMemory,
    {
        let descs: Vec<Descriptor> = chain.by_ref().collect();
        Self::parse(&descs, chain.memory(), capacity)
    }
}

/// A chain that is not a valid request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid block request: {error}")]
pub struct InvalidRequest {
    /// What is wrong.
    #[source]
    pub error: RequestError,
    /// The status byte address when the chain's last descriptor is a valid
    /// status descriptor: the device answers `VIRTIO_BLK_S_IOERR` there.
    pub status_addr: Option<GuestAddress>,
}

/// What makes a chain an invalid request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The chain has no descriptor.
    #[error("empty descriptor chain")]
    EmptyChain,
    /// The chain has only a header.
    #[error("no status descriptor")]
    NoStatusDescriptor,
    /// The status descriptor is empty, device-readable or outside memory.
    #[error("bad status descriptor")]
    BadStatusDescriptor,
    /// The header descriptor is device-writable.
    #[error("header descriptor is device-writable")]
    WritableHeader,
    /// The header descriptor is shorter than 16 bytes.
    #[error("header descriptor of {0} bytes")]
    ShortHeader(u32),
    /// The header is not in guest memory.
    #[error("header not in guest memory")]
    HeaderNotInMemory,
    /// A data descriptor has the wrong direction for the request.
    #[error("data descriptor {0} has the wrong direction")]
    DataDirection(usize),
    /// A data descriptor is outside guest memory.
    #[error("data descriptor {0} outside guest memory")]
    DataNotInMemory(usize),
    /// A request that needs data has none.
    #[error("request without data")]
    NoData,
    /// In/Out data length is not a multiple of 512.
    #[error("data length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    /// The request reaches past the end of the disk (or overflows).
    #[error("sectors {sector}+{sectors} beyond capacity {capacity}")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Sectors requested.
        sectors: u64,
        /// Disk size in sectors.
        capacity: u64,
    },
}

fn check_status<M: GuestMemory + ?Sized>(
    desc: &Descriptor,
    mem: &M,
) -> Result<GuestAddress, RequestError> {
    if desc.is_write_only()
        && desc.len() >= 1
        && mem.check_range(desc.addr(), 1, Permissions::Write)
    {
        // The status byte is the last byte of the descriptor.
        desc.addr()
            .checked_add(u64::from(desc.len()) - 1)
            .filter(|a| mem.check_range(*a, 1, Permissions::Write))
            .ok_or(RequestError::BadStatusDescriptor)
    } else {
        Err(RequestError::BadStatusDescriptor)
    }
}

fn read_header<M: GuestMemory + ?Sized>(
    desc: &Descriptor,
    mem: &M,
) -> Result<(RequestKind, u64), RequestError> {
    if desc.is_write_only() {
        return Err(RequestError::WritableHeader);
    }
    if desc.len() < REQUEST_HEADER_SIZE {
        return Err(RequestError::ShortHeader(desc.len()));
    }
    let mut raw = [0u8; REQUEST_HEADER_SIZE as usize];
    mem.read_slice(&mut raw, desc.addr())
        .map_err(|_| RequestError::HeaderNotInMemory)?;
    let (ty, rest) = raw.split_at(4);
    let sector_bytes = &rest[4..12];
    let ty = u32::from_le_bytes(ty.try_into().map_err(|_| RequestError::HeaderNotInMemory)?);
    let sector = u64::from_le_bytes(
        sector_bytes
            .try_into()
            .map_err(|_| RequestError::HeaderNotInMemory)?,
    );
    Ok((RequestKind::from_type(ty), sector))
}

/// Checks the data descriptors: direction (`device_writes`: the device fills
/// them) and presence in guest memory. Empty descriptors are dropped.
fn check_data<M: GuestMemory + ?Sized>(
    descs: &[Descriptor],
    device_writes: bool,
    mem: &M,
) -> Result<Vec<(GuestAddress, u32)>, RequestError> {
    let access = if device_writes {
        Permissions::Write
    } else {
        Permissions::Read
    };
    let mut buffers = Vec::with_capacity(descs.len());
    for (i, d) in descs.iter().enumerate() {
        if d.is_write_only() != device_writes {
            return Err(RequestError::DataDirection(i));
        }
        if d.len() == 0 {
            continue;
        }
        let len = usize::try_from(d.len()).map_err(|_| RequestError::DataNotInMemory(i))?;
        if !mem.check_range(d.addr(), len, access) {
            return Err(RequestError::DataNotInMemory(i));
        }
        buffers.push((d.addr(), d.len()));
    }
    Ok(buffers)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    pub(crate) const W: u16 = 2; // VRING_DESC_F_WRITE
    pub(crate) const HDR: u64 = 0x10_0000;
    pub(crate) const DATA: u64 = 0x20_0000;
    pub(crate) const STATUS: u64 = 0x30_0000;

    pub(crate) fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
    }

    pub(crate) fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    pub(crate) fn write_header(mem: &GuestMemoryMmap, ty: u32, sector: u64) {
        let mut raw = [0u8; 16];
        raw[..4].copy_from_slice(&ty.to_le_bytes());
        raw[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(HDR)).unwrap();
    }

    /// Builds the chain in a mock queue and parses it.
    fn parse(
        mem: &GuestMemoryMmap,
        descs: &[RawDescriptor],
        capacity: u64,
    ) -> Result<BlockRequest, InvalidRequest> {
        let q = MockSplitQueue::new(mem, 16);
        let chain = q.build_desc_chain(descs).unwrap();
        BlockRequest::parse_chain(chain, capacity)
    }

    #[test]
    fn parses_read_write_flush_getid() {
        assert_eq!(u32::from(W), VRING_DESC_F_WRITE);
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_IN, 2);
        let req = parse(
            &mem,
            &[
                desc(HDR, 16, 0),
                desc(DATA, 512, W),
                desc(DATA + 0x1000, 0, W),
                desc(DATA + 0x2000, 1024, W),
                desc(STATUS, 1, W),
            ],
            5,
        )
        .unwrap();
        assert_eq!(req.kind, RequestKind::In);
        assert_eq!(req.sector, 2);
        assert_eq!(
            req.data,
            vec![
                (GuestAddress(DATA), 512),
                (GuestAddress(DATA + 0x2000), 1024)
            ]
        );
        assert_eq!(req.data_len(), 1536);
        assert_eq!(req.status_addr, GuestAddress(STATUS));

        write_header(&mem, VIRTIO_BLK_T_OUT, 0);
        let req = parse(
            &mem,
            &[desc(HDR, 16, 0), desc(DATA, 4096, 0), desc(STATUS, 4, W)],
            8,
        )
        .unwrap();
        assert_eq!(req.kind, RequestKind::Out);
        // The status byte is the last byte of its descriptor.
        assert_eq!(req.status_addr, GuestAddress(STATUS + 3));

        write_header(&mem, VIRTIO_BLK_T_FLUSH, u64::MAX);
        let req = parse(&mem, &[desc(HDR, 16, 0), desc(STATUS, 1, W)], 0).unwrap();
        assert_eq!(req.kind, RequestKind::Flush);
        assert!(req.data.is_empty());

        write_header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        let req = parse(
            &mem,
            &[desc(HDR, 16, 0), desc(DATA, 20, W), desc(STATUS, 1, W)],
            0,
        )
        .unwrap();
        assert_eq!(req.kind, RequestKind::GetId);

        write_header(&mem, 11, 0);
        let req = parse(
            &mem,
            &[desc(HDR, 16, 0), desc(DATA, 20, 0), desc(STATUS, 1, W)],
            0,
        )
        .unwrap();
        assert_eq!(req.kind, RequestKind::Unsupported(11));
    }

    #[test]
    fn rejects_malformed_chains() {
        let mem = memory();
        let end = 0x100_0000u64;
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        let no_status = |error| InvalidRequest {
            error,
            status_addr: None,
        };
        let with_status = |error| InvalidRequest {
            error,
            status_addr: Some(GuestAddress(STATUS)),
        };
        let cases: Vec<(Vec<RawDescriptor>, InvalidRequest)> = vec![
            (
                vec![desc(HDR, 16, 0)],
                no_status(RequestError::NoStatusDescriptor),
            ),
            // Status descriptor read-only, empty, outside memory.
            (
                vec![desc(HDR, 16, 0), desc(STATUS, 1, 0)],
                no_status(RequestError::BadStatusDescriptor),
            ),
            (
                vec![desc(HDR, 16, 0), desc(STATUS, 0, W)],
                no_status(RequestError::BadStatusDescriptor),
            ),
            (
                vec![desc(HDR, 16, 0), desc(end, 1, W)],
                no_status(RequestError::BadStatusDescriptor),
            ),
            (
                vec![desc(HDR, 16, 0), desc(end - 1, 2, W)],
                no_status(RequestError::BadStatusDescriptor),
            ),
            (
                vec![desc(HDR, 16, 0), desc(u64::MAX, 1, W)],
                no_status(RequestError::BadStatusDescriptor),
            ),
            // Header problems.
            (
                vec![desc(HDR, 16, W), desc(DATA, 512, W), desc(STATUS, 1, W)],
                with_status(RequestError::WritableHeader),
            ),
            (
                vec![desc(HDR, 15, 0), desc(DATA, 512, W), desc(STATUS, 1, W)],
                with_status(RequestError::ShortHeader(15)),
            ),
            (
                vec![desc(end - 8, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, W)],
                with_status(RequestError::HeaderNotInMemory),
            ),
            // Data problems: read into a device-readable buffer, outside
            // memory, unaligned, missing, past the end of the disk.
            (
                vec![desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, W)],
                with_status(RequestError::DataDirection(0)),
            ),
            (
                vec![
                    desc(HDR, 16, 0),
                    desc(DATA, 512, W),
                    desc(end - 256, 512, W),
                    desc(STATUS, 1, W),
                ],
                with_status(RequestError::DataNotInMemory(1)),
            ),
            (
                vec![
                    desc(HDR, 16, 0),
                    desc(DATA, u32::MAX - 64, W),
                    desc(STATUS, 1, W),
                ],
                with_status(RequestError::DataNotInMemory(0)),
            ),
            // A chain longer than 4 GiB is cut short by virtio_queue: what
            // remains has no valid status descriptor.
            (
                vec![
                    desc(HDR, 16, 0),
                    desc(DATA, u32::MAX, W),
                    desc(STATUS, 1, W),
                ],
                no_status(RequestError::NoStatusDescriptor),
            ),
            (
                vec![desc(HDR, 16, 0), desc(DATA, 100, W), desc(STATUS, 1, W)],
                with_status(RequestError::UnalignedLength(100)),
            ),
            (
                vec![desc(HDR, 16, 0), desc(STATUS, 1, W)],
                with_status(RequestError::NoData),
            ),
            (
                vec![desc(HDR, 16, 0), desc(DATA, 4096, W), desc(STATUS, 1, W)],
                with_status(RequestError::OutOfRange {
                    sector: 0,
                    sectors: 8,
                    capacity: 4,
                }),
            ),
        ];
        for (i, (descs, expected)) in cases.into_iter().enumerate() {
            assert_eq!(parse(&mem, &descs, 4), Err(expected), "case {i}");
        }

        // Writes from device-writable buffers are refused too.
        write_header(&mem, VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            parse(
                &mem,
                &[desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, W)],
                4
            ),
            Err(with_status(RequestError::DataDirection(0)))
        );
        // Sector overflow.
        write_header(&mem, VIRTIO_BLK_T_OUT, u64::MAX);
        assert_eq!(
            parse(
                &mem,
                &[desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, W)],
                u64::MAX
            )
            .unwrap_err()
            .error,
            RequestError::OutOfRange {
                sector: u64::MAX,
                sectors: 1,
                capacity: u64::MAX
            }
        );
        // GET_ID without a buffer.
        write_header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        assert_eq!(
            parse(&mem, &[desc(HDR, 16, 0), desc(STATUS, 1, W)], 4),
            Err(with_status(RequestError::NoData))
        );
        // Empty chain.
        assert_eq!(
            BlockRequest::parse(&[], &mem, 4),
            Err(no_status(RequestError::EmptyChain))
        );
    }
}
