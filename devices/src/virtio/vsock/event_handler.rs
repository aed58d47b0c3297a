//! vsock on the VMM event loop: the three queue eventfds (event data = the
//! queue index) and the muxer's epoll fd, which gathers every host socket.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Vsock;
use crate::virtio::VirtioDevice;

/// Event data of the muxer's epoll fd (queue indexes are 0-2).
const MUXER_DATA: u32 = 3;

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        for (index, evt) in self.queue_events().iter().enumerate() {
            let Ok(data) = u32::try_from(index) else {
                continue;
            };
            if let Err(e) = ops.add(Events::with_data(evt, data, EventSet::IN)) {
                log::error!("vsock: cannot watch queue {index}: {e:?}");
            }
        }
        let muxer = Events::with_data_raw(self.muxer_fd(), MUXER_DATA, EventSet::IN);
        if let Err(e) = ops.add(muxer) {
            log::error!("vsock: cannot watch the host sockets: {e:?}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            MUXER_DATA => self.process_host_events(),
            data => match usize::try_from(data) {
                Ok(index) => self.queue_event(index),
                Err(_) => log::error!("vsock: unexpected event data {data}"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::sync::{Arc, Mutex};

    use event_manager::{EventManager, SubscriberOps};

    use super::*;

    #[test]
    fn queue_and_host_events_are_dispatched_before_activation() {
        let path = std::env::temp_dir().join(format!("tidevm-vsev-{}", std::process::id()));
        let dev = Arc::new(Mutex::new(Vsock::new(3, &path).unwrap()));
        let mut em = EventManager::<Arc<Mutex<Vsock>>>::new().unwrap();
        em.add_subscriber(dev.clone());
        dev.lock().unwrap().queue_events()[1].write(1).unwrap();
        assert_eq!(em.run_with_timeout(100).unwrap(), 1);
        assert!(dev.lock().unwrap().queue_events()[1].read().is_err());
        // A host client is accepted and its line read without a driver.
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"CONNECT 5\n").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while dev.lock().unwrap().metrics().host_connects == 0 {
            assert!(std::time::Instant::now() < deadline);
            em.run_with_timeout(50).unwrap();
        }
        // Nothing is pending any more: no busy loop.
        assert_eq!(em.run_with_timeout(50).unwrap(), 0);
    }
}
