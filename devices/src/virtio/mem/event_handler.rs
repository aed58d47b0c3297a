//! Queue processing of virtio-mem on the VMM event loop.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{error, warn};

use super::VirtioMem;
use crate::virtio::VirtioDevice;

impl MutEventSubscriber for VirtioMem {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let queue_event = &self.queue_events()[0];
        if events.fd() != queue_event.as_raw_fd() {
            warn!("virtio-mem: event on unknown fd {}", events.fd());
            return;
        }
        if !events.event_set().contains(EventSet::IN) {
            warn!(
                "virtio-mem: unexpected queue event set {:?}",
                events.event_set()
            );
            return;
        }
        if let Err(e) = queue_event.read() {
            if e.kind() != std::io::ErrorKind::WouldBlock {
                error!("virtio-mem: reading the queue eventfd failed: {e}");
            }
            return;
        }
        // Before activation the notification is dropped; activate() kicks
        // the eventfd again.
        self.process_queue();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.queue_events()[0], EventSet::IN)) {
            error!("virtio-mem: cannot register the queue eventfd: {e:?}");
        }
    }
}
