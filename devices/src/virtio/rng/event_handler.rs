//! virtio-rng on the VMM event loop: its one queue eventfd.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Rng;
use crate::virtio::VirtioDevice;

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.queue_events()[0], EventSet::IN)) {
            log::error!("virtio-rng: cannot watch the queue: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Non-blocking: an error only means it was not signalled.
        let _ = self.queue_events()[0].read();
        self.process_queue();
    }
}
