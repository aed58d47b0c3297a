//! The Dynamic Memory device on the VMM event loop: one eventfd, written by
//! the vCPU side for every posted message and channel signal (and by the
//! device itself when it yields with packets left to read).

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{error, warn};

use super::device::DynamicMemoryDevice;

impl MutEventSubscriber for DynamicMemoryDevice {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() != self.queue().kick_fd().as_raw_fd() {
            warn!("hv-balloon: event on unknown fd {}", events.fd());
            return;
        }
        if !events.event_set().contains(EventSet::IN) {
            warn!("hv-balloon: unexpected event set {:?}", events.event_set());
            return;
        }
        self.handle_wakeup();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.queue().kick_fd(), EventSet::IN)) {
            error!("hv-balloon: cannot register the device eventfd: {e:?}");
        }
    }
}
