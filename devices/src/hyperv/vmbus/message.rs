//! VMBus channel-management messages (Linux `include/linux/hyperv.h`,
//! `struct vmbus_channel_*`, all packed and little-endian).
//!
//! The guest posts a message with the `HvPostMessage` hypercall: a 256-byte
//! input block (checked by the VMM, `arch::hyperv::parse_post_message`)
//! carrying up to 240 payload bytes, which [`parse_guest_message`] decodes
//! into a [`ChannelMessage`]. The host
//! answers with [`HostMessage`]s, written into SynIC message slot 2 of the
//! target VP. Every message starts with an 8-byte header: `u32 msgtype`,
//! `u32 padding`.
//!
//! [`parse_guest_message`] is pure and never panics, whatever the bytes: it
//! is the fuzzing entry point of the channel-management path.

use super::guid::Guid;

/// Largest payload of a SynIC message, hence of a VMBus message.
pub const MAX_MESSAGE_SIZE: usize = 240;
/// Size of the header every VMBus message starts with.
pub const MESSAGE_HEADER_SIZE: usize = 8;
/// SINT on which VMBus messages and channel events arrive (slot 2 of the
/// SIMP and SIEFP pages).
pub const VMBUS_MESSAGE_SINT: u8 = 2;
/// SynIC message type of a VMBus message (`HV_MESSAGE_VMBUS`).
pub const HV_MESSAGE_TYPE_VMBUS: u32 = 1;
/// Connection id the guest posts messages to with VMBus up to 4.x.
pub const MESSAGE_CONNECTION_ID: u32 = 1;
/// Connection id of INITIATE_CONTACT for VMBus 5.0 and later. tidevm does not
/// listen on it: the post fails with "invalid connection id" (status 18)
/// and Linux moves on to version 4.1.
pub const MESSAGE_CONNECTION_ID_V5: u32 = 4;
/// Only the low 24 bits of a connection id are significant.
pub const CONNECTION_ID_MASK: u32 = 0x00ff_ffff;
/// Relids index a 2048-entry array in Linux and are event-flag bit numbers:
/// a relid must be below this.
pub const MAX_CHANNEL_RELIDS: u32 = 2048;

/// VMBus protocol 2.4 (Windows 8), `major << 16 | minor`.
pub const VERSION_WIN8: u32 = 0x0002_0004;
/// VMBus protocol 3.0 (Windows 8.1): the first version with UNLOAD.
pub const VERSION_WIN8_1: u32 = 0x0003_0000;
/// VMBus protocol 4.0 (Windows 10): the one version tidevm accepts.
pub const VERSION_WIN10: u32 = 0x0004_0000;
/// VMBus protocol 4.1: adds MODIFYCHANNEL. Rejected by tidevm.
pub const VERSION_WIN10_V4_1: u32 = 0x0004_0001;
/// VMBus protocol 5.0: INITIATE_CONTACT moves to connection id 4.
pub const VERSION_WIN10_V5: u32 = 0x0005_0000;
/// VMBus protocol 5.3, the first version Linux 6.12 tries.
pub const VERSION_WIN10_V5_3: u32 = 0x0005_0003;

/// Channel-management message types (`enum vmbus_channel_message_type`).
pub mod message_type {
    /// Host offers a channel.
    pub const OFFER_CHANNEL: u32 = 1;
    /// Host withdraws an offer.
    pub const RESCIND_CHANNEL_OFFER: u32 = 2;
    /// Guest asks for the offers.
    pub const REQUEST_OFFERS: u32 = 3;
    /// Host has sent every boot-time offer.
    pub const ALL_OFFERS_DELIVERED: u32 = 4;
    /// Guest opens a channel.
    pub const OPEN_CHANNEL: u32 = 5;
    /// Host answers OPEN_CHANNEL.
    pub const OPEN_CHANNEL_RESULT: u32 = 6;
    /// Guest closes a channel (no answer).
    pub const CLOSE_CHANNEL: u32 = 7;
    /// Guest describes a GPADL (first part).
    pub const GPADL_HEADER: u32 = 8;
    /// Guest continues a GPADL's PFN list.
    pub const GPADL_BODY: u32 = 9;
    /// Host answers a complete GPADL.
    pub const GPADL_CREATED: u32 = 10;
    /// Guest frees a GPADL.
    pub const GPADL_TEARDOWN: u32 = 11;
    /// Host answers GPADL_TEARDOWN.
    pub const GPADL_TORNDOWN: u32 = 12;
    /// Guest releases the relid of a rescinded channel.
    pub const RELID_RELEASED: u32 = 13;
    /// Guest proposes a protocol version.
    pub const INITIATE_CONTACT: u32 = 14;
    /// Host answers INITIATE_CONTACT.
    pub const VERSION_RESPONSE: u32 = 15;
    /// Guest disconnects (kexec, module unload, panic).
    pub const UNLOAD: u32 = 16;
    /// Host answers UNLOAD.
    pub const UNLOAD_RESPONSE: u32 = 17;
    /// Guest asks for an hv_sock connection (ignored).
    pub const TL_CONNECT_REQUEST: u32 = 21;
    /// Guest retargets a channel's interrupt, VMBus 4.1+ (ignored).
    pub const MODIFY_CHANNEL: u32 = 22;
}

/// Size of INITIATE_CONTACT as Linux posts it.
pub const INITIATE_CONTACT_SIZE: usize = 40;
/// Size of VERSION_RESPONSE.
pub const VERSION_RESPONSE_SIZE: usize = 16;
/// Size of OFFERCHANNEL.
pub const OFFER_CHANNEL_SIZE: usize = 196;
/// Size of the fixed part of GPADL_HEADER (the range data follows).
pub const GPADL_HEADER_FIXED_SIZE: usize = 20;
/// Size of the fixed part of GPADL_BODY (the PFNs follow).
pub const GPADL_BODY_FIXED_SIZE: usize = 16;
/// Size of GPADL_CREATED.
pub const GPADL_CREATED_SIZE: usize = 20;
/// Size of GPADL_TEARDOWN.
pub const GPADL_TEARDOWN_SIZE: usize = 16;
/// Size of GPADL_TORNDOWN.
pub const GPADL_TORNDOWN_SIZE: usize = 12;
/// Size of OPENCHANNEL (with its 120 bytes of user data).
pub const OPEN_CHANNEL_SIZE: usize = 148;
/// Size of OPENCHANNEL_RESULT.
pub const OPEN_RESULT_SIZE: usize = 20;
/// Size of CLOSECHANNEL and RELID_RELEASED.
pub const CHILD_RELID_MESSAGE_SIZE: usize = 12;

/// Status the host puts in GPADL_CREATED or OPENCHANNEL_RESULT to refuse a
/// request (NTSTATUS `STATUS_UNSUCCESSFUL`; Linux only checks for non-zero).
pub const STATUS_FAILURE: u32 = 0xc000_0001;

/// INITIATE_CONTACT: the guest proposes a protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitiateContact {
    /// Proposed version, `major << 16 | minor`.
    pub version_requested: u32,
    /// VP index that must receive channel-management messages.
    pub target_vcpu: u32,
    /// Below 5.0 the interrupt page GPA (unused since 2.4); from 5.0 byte 0
    /// is the message SINT and byte 1 the VTL.
    pub interrupt_page_or_sint: u64,
    /// Monitor page GPA (guest → host), unused: tidevm offers no monitored
    /// channel.
    pub monitor_page1: u64,
    /// Monitor page GPA (host → guest), unused.
    pub monitor_page2: u64,
}

/// GPADL_HEADER: the start of a guest page list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpadlHeader {
    /// Channel the GPADL is for.
    pub child_relid: u32,
    /// Guest-chosen handle of the GPADL.
    pub gpadl_id: u32,
    /// Total size of the range data (range descriptors and PFNs), spread
    /// over this message and the GPADL_BODY messages that follow.
    pub range_buflen: u16,
    /// Number of ranges (Linux always sends 1).
    pub range_count: u16,
    /// The range data this message carries (bytes 20.. of the message).
    pub range_data: Vec<u8>,
}

/// GPADL_BODY: more PFNs of a GPADL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpadlBody {
    /// Sequence number (Linux leaves it 0; not checked).
    pub message_number: u32,
    /// Handle of the GPADL it continues.
    pub gpadl_id: u32,
    /// The range data this message carries (bytes 16.. of the message).
    pub range_data: Vec<u8>,
}

/// OPENCHANNEL: the guest opens a channel on a GPADL holding both rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenChannel {
    /// Channel to open.
    pub child_relid: u32,
    /// Echoed in OPENCHANNEL_RESULT (Linux uses the relid).
    pub open_id: u32,
    /// GPADL holding the guest → host ring, then the host → guest ring.
    pub ring_gpadl_id: u32,
    /// VP index the host signals for this channel.
    pub target_vp: u32,
    /// First page of the host → guest ring within the GPADL.
    pub downstream_page_offset: u32,
}

/// A channel-management message from the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelMessage {
    /// Version proposal; resets the connection.
    InitiateContact(InitiateContact),
    /// Ask for the offers.
    RequestOffers,
    /// Start of a GPADL.
    GpadlHeader(GpadlHeader),
    /// Continuation of a GPADL.
    GpadlBody(GpadlBody),
    /// Open a channel.
    OpenChannel(OpenChannel),
    /// Close a channel.
    CloseChannel {
        /// Channel to close.
        child_relid: u32,
    },
    /// Free a GPADL.
    GpadlTeardown {
        /// Channel the GPADL belonged to.
        child_relid: u32,
        /// Handle of the GPADL.
        gpadl_id: u32,
    },
    /// Relid of a rescinded channel released (tidevm never rescinds).
    RelIdReleased {
        /// The released relid.
        child_relid: u32,
    },
    /// Disconnect.
    Unload,
    /// A type the host does not act on: host → guest types, hv_sock
    /// connects, MODIFYCHANNEL, numbers no version defines.
    Unknown {
        /// The message type.
        message_type: u32,
    },
}

/// Why a guest message could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// Shorter than the 8-byte header.
    #[error("message of {0} bytes is shorter than the 8-byte header")]
    TooShort(usize),
    /// Longer than a SynIC message payload.
    #[error("message of {0} bytes is longer than {MAX_MESSAGE_SIZE} bytes")]
    TooLong(usize),
    /// Shorter than its type requires.
    #[error("message type {message_type} needs {expected} bytes, got {actual}")]
    Truncated {
        /// The message type.
        message_type: u32,
        /// Bytes the type needs.
        expected: usize,
        /// Bytes the guest posted.
        actual: usize,
    },
}

fn read_u16(bytes: &[u8], at: usize) -> Option<u16> {
    let field = bytes.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes(field.try_into().ok()?))
}

pub(super) fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let field = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(field.try_into().ok()?))
}

fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let field = bytes.get(at..at.checked_add(8)?)?;
    Some(u64::from_le_bytes(field.try_into().ok()?))
}

/// Decodes the payload of a VMBus message the guest posted (exactly
/// `payload_size` bytes). Never panics; trailing bytes beyond a type's size
/// are ignored.
pub fn parse_guest_message(bytes: &[u8]) -> Result<ChannelMessage, MessageError> {
    use message_type as t;
    let actual = bytes.len();
    if actual > MAX_MESSAGE_SIZE {
        return Err(MessageError::TooLong(actual));
    }
    if actual < MESSAGE_HEADER_SIZE {
        return Err(MessageError::TooShort(actual));
    }
    let message_type = read_u32(bytes, 0).ok_or(MessageError::TooShort(actual))?;
    let expected = match message_type {
        t::INITIATE_CONTACT => INITIATE_CONTACT_SIZE,
        t::GPADL_HEADER => GPADL_HEADER_FIXED_SIZE,
        t::GPADL_BODY => GPADL_BODY_FIXED_SIZE,
        t::OPEN_CHANNEL => OPEN_CHANNEL_SIZE,
        t::GPADL_TEARDOWN => GPADL_TEARDOWN_SIZE,
        t::CLOSE_CHANNEL | t::RELID_RELEASED => CHILD_RELID_MESSAGE_SIZE,
        _ => MESSAGE_HEADER_SIZE,
    };
    let truncated = MessageError::Truncated {
        message_type,
        expected,
        actual,
    };
    if actual < expected {
        return Err(truncated);
    }
    let u16_at = |at| read_u16(bytes, at).ok_or(truncated);
    let u32_at = |at| read_u32(bytes, at).ok_or(truncated);
    let u64_at = |at| read_u64(bytes, at).ok_or(truncated);
    let tail = |from: usize| bytes.get(from..).unwrap_or_default().to_vec();
    Ok(match message_type {
        t::INITIATE_CONTACT => ChannelMessage::InitiateContact(InitiateContact {
            version_requested: u32_at(8)?,
            target_vcpu: u32_at(12)?,
            interrupt_page_or_sint: u64_at(16)?,
            monitor_page1: u64_at(24)?,
            monitor_page2: u64_at(32)?,
        }),
        t::REQUEST_OFFERS => ChannelMessage::RequestOffers,
        t::GPADL_HEADER => ChannelMessage::GpadlHeader(GpadlHeader {
            child_relid: u32_at(8)?,
            gpadl_id: u32_at(12)?,
            range_buflen: u16_at(16)?,
            range_count: u16_at(18)?,
            range_data: tail(GPADL_HEADER_FIXED_SIZE),
        }),
        t::GPADL_BODY => ChannelMessage::GpadlBody(GpadlBody {
            message_number: u32_at(8)?,
            gpadl_id: u32_at(12)?,
            range_data: tail(GPADL_BODY_FIXED_SIZE),
        }),
        t::OPEN_CHANNEL => ChannelMessage::OpenChannel(OpenChannel {
            child_relid: u32_at(8)?,
            open_id: u32_at(12)?,
            ring_gpadl_id: u32_at(16)?,
            target_vp: u32_at(20)?,
            downstream_page_offset: u32_at(24)?,
        }),
        t::CLOSE_CHANNEL => ChannelMessage::CloseChannel {
            child_relid: u32_at(8)?,
        },
        t::GPADL_TEARDOWN => ChannelMessage::GpadlTeardown {
            child_relid: u32_at(8)?,
            gpadl_id: u32_at(12)?,
        },
        t::RELID_RELEASED => ChannelMessage::RelIdReleased {
            child_relid: u32_at(8)?,
        },
        t::UNLOAD => ChannelMessage::Unload,
        _ => ChannelMessage::Unknown { message_type },
    })
}

/// What the host puts in an OFFERCHANNEL message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelOffer {
    /// Device class (`if_type`); drivers match on it.
    pub class_id: Guid,
    /// Device instance (`if_instance`); names the guest's device.
    pub instance_id: Guid,
    /// Relid of the channel, 1..[`MAX_CHANNEL_RELIDS`].
    pub child_relid: u32,
    /// Connection id the guest signals with `HvSignalEvent`.
    pub connection_id: u32,
}

/// A channel-management message from the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostMessage {
    /// Answer to INITIATE_CONTACT.
    VersionResponse {
        /// Whether the proposed version is accepted.
        version_supported: bool,
        /// Connection id for further messages (read by guests from 5.0 on).
        message_connection_id: u32,
    },
    /// A channel offer.
    OfferChannel(ChannelOffer),
    /// Every boot-time offer has been sent.
    AllOffersDelivered,
    /// Answer to a complete GPADL (status 0 = created).
    GpadlCreated {
        /// Relid from GPADL_HEADER.
        child_relid: u32,
        /// Handle of the GPADL.
        gpadl_id: u32,
        /// 0 or [`STATUS_FAILURE`].
        status: u32,
    },
    /// Answer to OPENCHANNEL (status 0 = open).
    OpenResult {
        /// Relid from OPENCHANNEL.
        child_relid: u32,
        /// Open id from OPENCHANNEL.
        open_id: u32,
        /// 0 or [`STATUS_FAILURE`].
        status: u32,
    },
    /// Answer to GPADL_TEARDOWN.
    GpadlTorndown {
        /// Handle of the GPADL.
        gpadl_id: u32,
    },
    /// Answer to UNLOAD.
    UnloadResponse,
}

fn put_u32(buf: &mut [u8], at: usize, value: u32) {
    if let Some(field) = buf.get_mut(at..at + 4) {
        field.copy_from_slice(&value.to_le_bytes());
    }
}

impl HostMessage {
    /// The message type in the header.
    pub fn message_type(&self) -> u32 {
        use message_type as t;
        match self {
            Self::VersionResponse { .. } => t::VERSION_RESPONSE,
            Self::OfferChannel(_) => t::OFFER_CHANNEL,
            Self::AllOffersDelivered => t::ALL_OFFERS_DELIVERED,
            Self::GpadlCreated { .. } => t::GPADL_CREATED,
            Self::OpenResult { .. } => t::OPEN_CHANNEL_RESULT,
            Self::GpadlTorndown { .. } => t::GPADL_TORNDOWN,
            Self::UnloadResponse => t::UNLOAD_RESPONSE,
        }
    }

    /// The message bytes, exactly as long as the Linux struct (at most
    /// [`MAX_MESSAGE_SIZE`]); they go into the payload of a SynIC message
    /// whose `payload_size` is this length.
    pub fn encode(&self) -> Vec<u8> {
        let size = match self {
            Self::VersionResponse { .. } => VERSION_RESPONSE_SIZE,
            Self::OfferChannel(_) => OFFER_CHANNEL_SIZE,
            Self::AllOffersDelivered | Self::UnloadResponse => MESSAGE_HEADER_SIZE,
            Self::GpadlCreated { .. } => GPADL_CREATED_SIZE,
            Self::OpenResult { .. } => OPEN_RESULT_SIZE,
            Self::GpadlTorndown { .. } => GPADL_TORNDOWN_SIZE,
        };
        let mut buf = vec![0u8; size];
        put_u32(&mut buf, 0, self.message_type());
        match *self {
            Self::VersionResponse {
                version_supported,
                message_connection_id,
            } => {
                // 8: version_supported, 9: connection_state (0 = ok), 12: msg_conn_id.
                buf[8] = u8::from(version_supported);
                put_u32(&mut buf, 12, message_connection_id);
            }
            Self::OfferChannel(offer) => {
                buf[8..24].copy_from_slice(&offer.class_id.to_bytes());
                buf[24..40].copy_from_slice(&offer.instance_id.to_bytes());
                // 40..56 reserved, 56 chn_flags, 58 mmio_megabytes,
                // 60..180 user_def, 180 sub_channel_index, all 0.
                put_u32(&mut buf, 184, offer.child_relid);
                // 188 monitorid 0, 189 monitor_allocated 0: the guest
                // signals with HvSignalEvent, not monitor pages.
                buf[190] = 1; // is_dedicated_interrupt
                put_u32(&mut buf, 192, offer.connection_id);
            }
            Self::GpadlCreated {
                child_relid,
                gpadl_id,
                status,
            } => {
                put_u32(&mut buf, 8, child_relid);
                put_u32(&mut buf, 12, gpadl_id);
                put_u32(&mut buf, 16, status);
            }
            Self::OpenResult {
                child_relid,
                open_id,
                status,
            } => {
                put_u32(&mut buf, 8, child_relid);
                put_u32(&mut buf, 12, open_id);
                put_u32(&mut buf, 16, status);
            }
            Self::GpadlTorndown { gpadl_id } => put_u32(&mut buf, 8, gpadl_id),
            Self::AllOffersDelivered | Self::UnloadResponse => {}
        }
        buf
    }
}

#[cfg(test)]
#[path = "message_tests.rs"]
mod tests;
