//! Queue processing of [`Block`] on the VMM event loop.
//!
//! `init` registers the queue eventfd (the one the VMM also registers as
//! KVM ioeventfd on QueueNotify); `process` drains it and, if the device is
//! active, processes the queue.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Block;

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        for evt in self.queue_evts() {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                log::error!("virtio-blk: cannot watch queue eventfd: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        let Some(evt) = self.queue_evts().iter().find(|e| e.as_raw_fd() == fd) else {
            log::warn!("virtio-blk: event on unknown fd {fd}");
            return;
        };
        // Non-blocking eventfd: an error only means it was not signalled.
        let _ = evt.read();
        if self.is_activated() {
            self.process_queue();
        }
    }
}
