//! The host's VMBus channel-management state machine, for the one channel
//! tidevm offers (the Dynamic Memory device).
//!
//! ```text
//! Disconnected ──INITIATE_CONTACT 4.0──▶ Connected ──REQUESTOFFERS──▶ offered
//!      ▲   (any other version: refused,            │ GPADL_HEADER/BODY ─▶ GPADL_CREATED
//!      │    stays Disconnected)                    │ OPENCHANNEL ─▶ OpenChannel action,
//!      │                                           │   complete_open ─▶ OPENCHANNEL_RESULT
//!      │                                           │ CLOSECHANNEL ─▶ CloseChannel action
//!      │                                           │ GPADL_TEARDOWN ─▶ GPADL_TORNDOWN
//!      └──── UNLOAD (─▶ UNLOAD_RESPONSE), INITIATE_CONTACT, reset() ◀┘
//! ```
//!
//! Every guest request that Linux waits for gets an answer, with a failure
//! status when it cannot be granted: Linux waits without a timeout, so a
//! dropped request hangs the guest. Malformed or out-of-place messages that
//! nobody waits for are logged, counted in [`ServerStats`] and dropped; the
//! server keeps serving.
//!
//! The VMM feeds [`VmbusServer::handle_payload`] with each posted message
//! in order (the VMM checks the hypercall input block first,
//! `arch::hyperv::parse_post_message`), then for each
//! [`ServerOutput`] performs the actions first and queues the messages
//! after, delivering them one SynIC message at a time to
//! [`OutgoingMessage::target_vp`]. An [`ServerAction::OpenChannel`] must be
//! answered with [`VmbusServer::complete_open`] before the next message is
//! handled.

use log::{debug, info, warn};

use super::gpadl::{GpadlFailure, GpadlProgress, GpadlTable};
use super::message::{
    parse_guest_message, ChannelMessage, ChannelOffer, GpadlBody, GpadlHeader, HostMessage,
    InitiateContact, OpenChannel, MAX_CHANNEL_RELIDS, MESSAGE_CONNECTION_ID, STATUS_FAILURE,
    VERSION_WIN10,
};

/// The only VMBus version served (4.0). Linux 6.12 offers 5.3 … 5.0 on
/// connection id 4 (refused by the hypercall), then 4.1 (refused here), then
/// 4.0.
pub const SUPPORTED_VERSION: u32 = VERSION_WIN10;

/// A server configuration that cannot work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ServerConfigError {
    /// The relid is 0 or too large for Linux's relid table.
    #[error("child relid {0} must be between 1 and {max}", max = MAX_CHANNEL_RELIDS - 1)]
    BadRelid(u32),
    /// The connection id is reserved (1-4) or wider than 24 bits.
    #[error("connection id {0:#x} must be above 4 and below 2^24")]
    BadConnectionId(u32),
    /// No vCPU to deliver messages to.
    #[error("the VM needs at least one vCPU")]
    NoVcpus,
}

/// A message to deliver through SynIC message slot 2 of a VP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutgoingMessage {
    /// VP index whose message page receives it.
    pub target_vp: u32,
    /// The message; [`HostMessage::encode`] gives the payload bytes.
    pub message: HostMessage,
}

/// What the VMM needs to open the channel's rings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenRequest {
    /// Relid of the channel: also its bit in the event-flag page.
    pub child_relid: u32,
    /// Connection id the guest signals with `HvSignalEvent` (register the
    /// channel's eventfd with `KVM_HYPERV_EVENTFD` on it).
    pub connection_id: u32,
    /// VP to signal (event flag in its SIEFP slot 2, then SINT 2).
    pub target_vp: u32,
    /// GPADL holding the rings.
    pub gpadl_id: u32,
    /// Pages of the guest → host ring (control page first): the host reads.
    pub guest_to_host_pfns: Vec<u64>,
    /// Pages of the host → guest ring (control page first): the host writes.
    pub host_to_guest_pfns: Vec<u64>,
}

/// Something the VMM must do, before queuing the output's messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAction {
    /// The connection was reset (INITIATE_CONTACT, UNLOAD or
    /// [`VmbusServer::reset`]): drop the host → guest messages still waiting
    /// for delivery (they belong to the old connection; this output's own
    /// messages come after), and reset the devices behind the channel
    /// (Dynamic Memory: ballooned pages count as returned).
    ConnectionReset,
    /// Map the rings, register the event connection id, then call
    /// [`VmbusServer::complete_open`] with the result.
    OpenChannel(OpenRequest),
    /// Stop using the channel's rings, unregister its event connection id,
    /// and reset the device behind it.
    CloseChannel {
        /// Relid of the channel.
        child_relid: u32,
    },
}

/// What one step of the server produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerOutput {
    /// To do first, in order.
    pub actions: Vec<ServerAction>,
    /// To deliver after, in order.
    pub messages: Vec<OutgoingMessage>,
}

/// Counters for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Messages handled (well-formed or not).
    pub messages: u64,
    /// Messages that could not be decoded.
    pub malformed: u64,
    /// Messages dropped: out of place, unknown, or nothing to do.
    pub ignored: u64,
    /// Requests answered with a failure status.
    pub refused: u64,
}

/// State of the offered channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelState {
    /// Not open.
    Closed,
    /// OPENCHANNEL accepted, waiting for [`VmbusServer::complete_open`].
    Opening {
        /// Open id to echo.
        open_id: u32,
        /// GPADL of the rings.
        gpadl_id: u32,
    },
    /// Open.
    Open {
        /// GPADL of the rings.
        gpadl_id: u32,
    },
}

#[derive(Debug, Clone, Copy)]
struct Connection {
    target_vp: u32,
    offers_sent: bool,
}

/// Why an OPENCHANNEL is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum OpenRefusal {
    #[error("relid {0} is not offered")]
    UnknownRelid(u32),
    #[error("the channel is already open")]
    AlreadyOpen,
    #[error("GPADL {0:#x} is not a complete GPADL of this channel")]
    NoGpadl(u32),
    #[error("GPADL {0:#x} is not one page-aligned range")]
    UnalignedGpadl(u32),
    #[error("downstream offset {offset} leaves no two-page ring in {pages} pages")]
    BadSplit { offset: u32, pages: usize },
    #[error("target VP {0} does not exist")]
    BadTargetVp(u32),
}

/// The channel-management state machine.
#[derive(Debug)]
pub struct VmbusServer {
    offer: ChannelOffer,
    vcpu_count: u32,
    connection: Option<Connection>,
    /// VP of the last INITIATE_CONTACT, for answers while disconnected.
    last_contact_vp: u32,
    channel: ChannelState,
    gpadls: GpadlTable,
    stats: ServerStats,
}

impl VmbusServer {
    /// A disconnected server that will offer `offer` to a guest with
    /// `vcpu_count` vCPUs (VP index = vCPU index).
    pub fn new(offer: ChannelOffer, vcpu_count: u32) -> Result<Self, ServerConfigError> {
        if offer.child_relid == 0 || offer.child_relid >= MAX_CHANNEL_RELIDS {
            return Err(ServerConfigError::BadRelid(offer.child_relid));
        }
        if offer.connection_id <= 4 || offer.connection_id > 0x00ff_ffff {
            return Err(ServerConfigError::BadConnectionId(offer.connection_id));
        }
        if vcpu_count == 0 {
            return Err(ServerConfigError::NoVcpus);
        }
        Ok(Self {
            offer,
            vcpu_count,
            connection: None,
            last_contact_vp: 0,
            channel: ChannelState::Closed,
            gpadls: GpadlTable::new(),
            stats: ServerStats::default(),
        })
    }

    /// The offer this server makes.
    pub fn offer(&self) -> &ChannelOffer {
        &self.offer
    }

    /// Whether a version has been negotiated.
    pub fn is_connected(&self) -> bool {
        self.connection.is_some()
    }

    /// VP that receives channel-management messages, once connected.
    pub fn message_target_vp(&self) -> Option<u32> {
        self.connection.map(|connection| connection.target_vp)
    }

    /// State of the offered channel.
    pub fn channel_state(&self) -> ChannelState {
        self.channel
    }

    /// The counters.
    pub fn stats(&self) -> ServerStats {
        self.stats
    }

    /// Decodes and handles one posted message payload.
    pub fn handle_payload(&mut self, payload: &[u8]) -> ServerOutput {
        match parse_guest_message(payload) {
            Ok(message) => self.handle_message(&message),
            Err(error) => {
                self.stats.messages += 1;
                self.stats.malformed += 1;
                warn!("vmbus: malformed message dropped: {error}");
                ServerOutput::default()
            }
        }
    }

    /// Handles one decoded guest message.
    pub fn handle_message(&mut self, message: &ChannelMessage) -> ServerOutput {
        self.stats.messages += 1;
        let mut out = ServerOutput::default();
        match message {
            ChannelMessage::InitiateContact(contact) => self.initiate_contact(contact, &mut out),
            ChannelMessage::Unload => self.unload(&mut out),
            _ => match self.connection {
                Some(connection) => self.handle_connected(message, connection, &mut out),
                None => self.ignore(message, "not connected"),
            },
        }
        out
    }

    /// Tells the server how opening the rings of an
    /// [`ServerAction::OpenChannel`] went, and returns the OPENCHANNEL_RESULT.
    pub fn complete_open(&mut self, opened: bool) -> ServerOutput {
        let mut out = ServerOutput::default();
        let (ChannelState::Opening { open_id, gpadl_id }, Some(connection)) =
            (self.channel, self.connection)
        else {
            warn!("vmbus: open completion without an open in progress");
            return out;
        };
        let status = if opened {
            self.channel = ChannelState::Open { gpadl_id };
            info!("vmbus: channel {} open", self.offer.child_relid);
            0
        } else {
            self.channel = ChannelState::Closed;
            self.stats.refused += 1;
            warn!(
                "vmbus: channel {} rings could not be opened",
                self.offer.child_relid
            );
            STATUS_FAILURE
        };
        out.messages.push(OutgoingMessage {
            target_vp: connection.target_vp,
            message: HostMessage::OpenResult {
                child_relid: self.offer.child_relid,
                open_id,
                status,
            },
        });
        out
    }

    /// Back to the power-on state (VM reset): closes the channel, forgets
    /// GPADLs and the connection. Sends nothing.
    pub fn reset(&mut self) -> ServerOutput {
        let mut out = ServerOutput::default();
        self.disconnect(&mut out);
        self.last_contact_vp = 0;
        out
    }

    fn ignore(&mut self, message: &ChannelMessage, why: &str) {
        self.stats.ignored += 1;
        debug!("vmbus: {message:?} ignored: {why}");
    }

    fn close_channel(&mut self, out: &mut ServerOutput) {
        if self.channel != ChannelState::Closed {
            self.channel = ChannelState::Closed;
            out.actions.push(ServerAction::CloseChannel {
                child_relid: self.offer.child_relid,
            });
        }
    }

    fn disconnect(&mut self, out: &mut ServerOutput) {
        self.close_channel(out);
        if self.connection.is_some() || !self.gpadls.is_empty() {
            out.actions.push(ServerAction::ConnectionReset);
        }
        self.connection = None;
        self.gpadls.clear();
    }

    fn initiate_contact(&mut self, contact: &InitiateContact, out: &mut ServerOutput) {
        // Every INITIATE_CONTACT starts over, whatever the state: a crash
        // kernel or a new hv_vmbus does not unload first.
        self.disconnect(out);
        let target_exists = contact.target_vcpu < self.vcpu_count;
        let target_vp = if target_exists {
            contact.target_vcpu
        } else {
            0
        };
        self.last_contact_vp = target_vp;
        let accepted = target_exists && contact.version_requested == SUPPORTED_VERSION;
        if accepted {
            info!("vmbus: connected, version 4.0, messages to VP {target_vp}");
            self.connection = Some(Connection {
                target_vp,
                offers_sent: false,
            });
        } else {
            debug!(
                "vmbus: version {:#x} (target VP {}) refused",
                contact.version_requested, contact.target_vcpu
            );
        }
        out.messages.push(OutgoingMessage {
            target_vp,
            message: HostMessage::VersionResponse {
                version_supported: accepted,
                message_connection_id: MESSAGE_CONNECTION_ID,
            },
        });
    }

    fn unload(&mut self, out: &mut ServerOutput) {
        let target_vp = self.message_target_vp().unwrap_or(self.last_contact_vp);
        self.disconnect(out);
        info!("vmbus: unloaded");
        out.messages.push(OutgoingMessage {
            target_vp,
            message: HostMessage::UnloadResponse,
        });
    }

    fn handle_connected(
        &mut self,
        message: &ChannelMessage,
        connection: Connection,
        out: &mut ServerOutput,
    ) {
        let target_vp = connection.target_vp;
        let mut reply = |message| out.messages.push(OutgoingMessage { target_vp, message });
        match message {
            ChannelMessage::RequestOffers => {
                if !connection.offers_sent {
                    reply(HostMessage::OfferChannel(self.offer));
                    self.connection = Some(Connection {
                        offers_sent: true,
                        ..connection
                    });
                }
                reply(HostMessage::AllOffersDelivered);
            }
            ChannelMessage::GpadlHeader(header) => {
                if let Some(message) = self.gpadl_header(header, connection.offers_sent) {
                    reply(message);
                }
            }
            ChannelMessage::GpadlBody(body) => {
                if let Some(message) = self.gpadl_body(body) {
                    reply(message);
                }
            }
            ChannelMessage::OpenChannel(open) => match self.check_open(open, connection) {
                Ok(request) => {
                    self.channel = ChannelState::Opening {
                        open_id: open.open_id,
                        gpadl_id: open.ring_gpadl_id,
                    };
                    out.actions.push(ServerAction::OpenChannel(request));
                }
                Err(refusal) => {
                    self.stats.refused += 1;
                    warn!("vmbus: OPENCHANNEL refused: {refusal}");
                    reply(HostMessage::OpenResult {
                        child_relid: open.child_relid,
                        open_id: open.open_id,
                        status: STATUS_FAILURE,
                    });
                }
            },
            ChannelMessage::CloseChannel { child_relid } => {
                if *child_relid == self.offer.child_relid && self.channel != ChannelState::Closed {
                    info!("vmbus: channel {child_relid} closed by the guest");
                    self.close_channel(out);
                } else {
                    self.ignore(message, "channel not open");
                }
            }
            ChannelMessage::GpadlTeardown { gpadl_id, .. } => {
                let rings_gpadl = match self.channel {
                    ChannelState::Opening { gpadl_id, .. } | ChannelState::Open { gpadl_id } => {
                        Some(gpadl_id)
                    }
                    ChannelState::Closed => None,
                };
                if rings_gpadl == Some(*gpadl_id) {
                    // Linux closes first; a guest that frees the rings of
                    // an open channel loses the channel.
                    warn!("vmbus: GPADL {gpadl_id:#x} torn down under an open channel");
                    self.close_channel(out);
                }
                if !self.gpadls.remove(*gpadl_id) {
                    debug!("vmbus: teardown of unknown GPADL {gpadl_id:#x} answered anyway");
                }
                out.messages.push(OutgoingMessage {
                    target_vp,
                    message: HostMessage::GpadlTorndown {
                        gpadl_id: *gpadl_id,
                    },
                });
            }
            // INITIATE_CONTACT and UNLOAD never get here (see handle_message).
            ChannelMessage::RelIdReleased { .. }
            | ChannelMessage::Unknown { .. }
            | ChannelMessage::InitiateContact(_)
            | ChannelMessage::Unload => self.ignore(message, "nothing to do"),
        }
    }

    fn gpadl_created(&mut self, child_relid: u32, gpadl_id: u32, ok: bool) -> HostMessage {
        if !ok {
            self.stats.refused += 1;
        }
        HostMessage::GpadlCreated {
            child_relid,
            gpadl_id,
            status: if ok { 0 } else { STATUS_FAILURE },
        }
    }

    fn gpadl_header(&mut self, header: &GpadlHeader, offers_sent: bool) -> Option<HostMessage> {
        if !offers_sent || header.child_relid != self.offer.child_relid {
            warn!(
                "vmbus: GPADL {:#x} for relid {} refused: not offered",
                header.gpadl_id, header.child_relid
            );
            return Some(self.gpadl_created(header.child_relid, header.gpadl_id, false));
        }
        let progress = self.gpadls.on_header(header);
        self.gpadl_progress(progress)
    }

    fn gpadl_body(&mut self, body: &GpadlBody) -> Option<HostMessage> {
        let progress = self.gpadls.on_body(body);
        self.gpadl_progress(progress)
    }

    fn gpadl_progress(
        &mut self,
        progress: Result<GpadlProgress, GpadlFailure>,
    ) -> Option<HostMessage> {
        match progress {
            Ok(GpadlProgress::Incomplete) => None,
            Ok(GpadlProgress::Complete {
                child_relid,
                gpadl_id,
            }) => {
                debug!("vmbus: GPADL {gpadl_id:#x} created");
                Some(self.gpadl_created(child_relid, gpadl_id, true))
            }
            Err(failure) => {
                warn!("vmbus: {failure}");
                match failure.reply_relid {
                    Some(relid) => Some(self.gpadl_created(relid, failure.gpadl_id, false)),
                    None => {
                        self.stats.ignored += 1;
                        None
                    }
                }
            }
        }
    }

    fn check_open(
        &self,
        open: &OpenChannel,
        connection: Connection,
    ) -> Result<OpenRequest, OpenRefusal> {
        if !connection.offers_sent || open.child_relid != self.offer.child_relid {
            return Err(OpenRefusal::UnknownRelid(open.child_relid));
        }
        if self.channel != ChannelState::Closed {
            return Err(OpenRefusal::AlreadyOpen);
        }
        let gpadl = self
            .gpadls
            .get(open.ring_gpadl_id)
            .filter(|gpadl| gpadl.child_relid == open.child_relid)
            .ok_or(OpenRefusal::NoGpadl(open.ring_gpadl_id))?;
        let pfns = gpadl
            .page_aligned_pfns()
            .ok_or(OpenRefusal::UnalignedGpadl(open.ring_gpadl_id))?;
        // Each ring needs a control page and at least one data page.
        let bad_split = OpenRefusal::BadSplit {
            offset: open.downstream_page_offset,
            pages: pfns.len(),
        };
        let split = usize::try_from(open.downstream_page_offset).map_err(|_| bad_split)?;
        if split < 2 || pfns.len().saturating_sub(split) < 2 {
            return Err(bad_split);
        }
        let (guest_to_host, host_to_guest) = (pfns.get(..split), pfns.get(split..));
        let (Some(guest_to_host), Some(host_to_guest)) = (guest_to_host, host_to_guest) else {
            return Err(bad_split);
        };
        if open.target_vp >= self.vcpu_count {
            return Err(OpenRefusal::BadTargetVp(open.target_vp));
        }
        Ok(OpenRequest {
            child_relid: open.child_relid,
            connection_id: self.offer.connection_id,
            target_vp: open.target_vp,
            gpadl_id: open.ring_gpadl_id,
            guest_to_host_pfns: guest_to_host.to_vec(),
            host_to_guest_pfns: host_to_guest.to_vec(),
        })
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
