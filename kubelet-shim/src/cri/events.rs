//! Container events for GetContainerEvents (kubelet's evented PLEG). Every change
//! of a container's state, as the server records it, goes to every subscriber.
//! A subscriber that falls [`BACKLOG`] events behind is dropped: its stream ends,
//! and kubelet falls back to listing, as it does when a runtime restarts.

use std::collections::HashMap;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Mutex;

use super::store::{ContainerRecord, ContainerState};

/// Events a subscriber may have pending.
pub const BACKLOG: usize = 1024;

/// What happened to a container (the CRI's ContainerEventType).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Created,
    Started,
    Stopped,
    Deleted,
}

/// One event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerEvent {
    pub container_id: String,
    pub sandbox_id: String,
    pub kind: EventKind,
    /// Nanoseconds since the epoch.
    pub at_ns: i64,
}

/// The subscribers, and what each container last was.
#[derive(Debug, Default)]
pub struct EventBus {
    subscribers: Mutex<Vec<SyncSender<ContainerEvent>>>,
    last: Mutex<HashMap<String, EventKind>>,
}

impl EventBus {
    /// A new subscriber's receiving end.
    pub fn subscribe(&self) -> Receiver<ContainerEvent> {
        let (tx, rx) = sync_channel(BACKLOG);
        self.subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tx);
        rx
    }

    /// A container as just recorded: an event when its state changed.
    pub fn record(&self, c: &ContainerRecord, at_ns: i64) {
        let kind = match c.state {
            ContainerState::Created => EventKind::Created,
            ContainerState::Running => EventKind::Started,
            ContainerState::Exited | ContainerState::Unknown => EventKind::Stopped,
        };
        let changed = self
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(c.id.clone(), kind)
            != Some(kind);
        if changed {
            self.emit(ContainerEvent {
                container_id: c.id.clone(),
                sandbox_id: c.sandbox_id.clone(),
                kind,
                at_ns,
            });
        }
    }

    /// A container removed.
    pub fn deleted(&self, container_id: &str, sandbox_id: &str, at_ns: i64) {
        let known = self
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(container_id)
            .is_some();
        if known {
            self.emit(ContainerEvent {
                container_id: container_id.to_owned(),
                sandbox_id: sandbox_id.to_owned(),
                kind: EventKind::Deleted,
                at_ns,
            });
        }
    }

    fn emit(&self, ev: ContainerEvent) {
        self.subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|s| match s.try_send(ev.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    tracing::warn!(
                        "a GetContainerEvents subscriber fell {BACKLOG} events behind: dropped"
                    );
                    false
                }
                Err(TrySendError::Disconnected(_)) => false,
            });
    }

    /// How many subscribers there are.
    pub fn subscribers(&self) -> usize {
        self.subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, state: ContainerState) -> ContainerRecord {
        ContainerRecord {
            id: id.into(),
            sandbox_id: "sb".into(),
            state,
            ..ContainerRecord::default()
        }
    }

    #[test]
    fn events_follow_state_changes_once_and_slow_subscribers_are_dropped() {
        let bus = EventBus::default();
        let rx = bus.subscribe();
        bus.record(&rec("c1", ContainerState::Created), 1);
        bus.record(&rec("c1", ContainerState::Created), 2);
        bus.record(&rec("c1", ContainerState::Running), 3);
        bus.record(&rec("c1", ContainerState::Exited), 4);
        bus.deleted("c1", "sb", 5);
        bus.deleted("c1", "sb", 6);
        let got: Vec<(EventKind, i64)> = rx.try_iter().map(|e| (e.kind, e.at_ns)).collect();
        assert_eq!(
            got,
            [
                (EventKind::Created, 1),
                (EventKind::Started, 3),
                (EventKind::Stopped, 4),
                (EventKind::Deleted, 5)
            ]
        );
        // One that never reads is dropped once its backlog is full; a gone one too.
        let slow = bus.subscribe();
        drop(bus.subscribe());
        for i in 0..=BACKLOG {
            bus.record(&rec(&format!("c{i}"), ContainerState::Created), 0);
        }
        assert_eq!(bus.subscribers(), 0, "rx was not read either");
        assert_eq!(slow.try_iter().count(), BACKLOG);
    }
}
