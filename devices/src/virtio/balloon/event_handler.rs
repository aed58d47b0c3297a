//! Balloon I/O on the VMM event loop.
//!
//! `init` registers one eventfd per offered queue (event data = queue index)
//! and, when statistics are enabled, the statistics timer.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::error;

use super::device::Balloon;
use crate::virtio::VirtioDevice;

/// Event data of the statistics timer (queue indexes are small).
const STATS_TIMER_DATA: u32 = u32::MAX;

impl MutEventSubscriber for Balloon {
    fn init(&mut self, ops: &mut EventOps) {
        for (index, evt) in self.queue_events().iter().enumerate() {
            let Ok(data) = u32::try_from(index) else {
                continue;
            };
            if let Err(e) = ops.add(Events::with_data(evt, data, EventSet::IN)) {
                error!("balloon: registering queue {index} eventfd failed: {e:?}");
            }
        }
        if let Some(fd) = self.stats_timer_fd() {
            let events = Events::with_data_raw(fd, STATS_TIMER_DATA, EventSet::IN);
            if let Err(e) = ops.add(events) {
                error!("balloon: registering the statistics timer failed: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            STATS_TIMER_DATA => self.handle_stats_timer(),
            data => match usize::try_from(data) {
                Ok(index) => self.handle_queue_event(index),
                Err(_) => error!("balloon: unexpected event data {data}"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use event_manager::{EventManager, SubscriberOps};

    use super::super::BalloonConfig;
    use super::*;

    #[test]
    fn event_manager_dispatches_queue_and_timer_events() {
        let balloon = Arc::new(Mutex::new(
            Balloon::new(BalloonConfig {
                target_size: 0,
                deflate_on_oom: false,
                free_page_reporting: true,
                stats_period_s: 1,
            })
            .unwrap(),
        ));
        let mut manager = EventManager::<Arc<Mutex<Balloon>>>::new().unwrap();
        manager.add_subscriber(balloon.clone());

        // A notification on an inactive device is consumed and ignored.
        balloon.lock().unwrap().queue_events()[3].write(1).unwrap();
        assert_eq!(manager.run_with_timeout(100).unwrap(), 1);
        assert!(balloon.lock().unwrap().queue_events()[3].read().is_err());
        // Nothing else is pending (the timer is not armed before activation).
        assert_eq!(manager.run_with_timeout(10).unwrap(), 0);
    }
}
