//! A VM's life as a table: which event moves which state where. Pure, and the only place a
//! VM's status is decided; every transition not in the table is refused.

use crate::records::Status;

/// What happens to a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// Its hypervisor was started, by a create or a start.
    Launched,
    /// Its guest said it is ready.
    Ready,
    /// Its guest powered off cleanly after it was ready, or the host restarted under it.
    PoweredOff,
    /// Creating, starting, booting or running it failed.
    Failed,
    /// A stop began.
    Stop,
    /// Its hypervisor ended after a stop.
    Halted,
    /// A delete began (or is retried).
    Delete,
}

impl Event {
    /// What the event is, for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Launched => "start its hypervisor",
            Event::Ready => "become ready",
            Event::PoweredOff => "power off",
            Event::Failed => "fail",
            Event::Stop => "stop",
            Event::Halted => "finish stopping",
            Event::Delete => "be deleted",
        }
    }
}

/// A transition the table does not have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Illegal {
    /// The state.
    pub from: Status,
    /// The event refused in it.
    pub event: Event,
}

impl std::fmt::Display for Illegal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "a {} VM cannot {}",
            self.from.as_str(),
            self.event.as_str()
        )
    }
}

/// The state `event` moves a VM in state `from` to.
pub fn next(from: Status, event: Event) -> Result<Status, Illegal> {
    use Event as E;
    use Status as S;
    match (from, event) {
        (S::Creating | S::Stopped | S::Failed, E::Launched) => Ok(S::Booting),
        (S::Booting, E::Ready) => Ok(S::Running),
        (S::Booting | S::Running, E::PoweredOff) => Ok(S::Stopped),
        (S::Creating | S::Booting | S::Running | S::Stopped | S::Failed, E::Failed) => {
            Ok(S::Failed)
        }
        (S::Booting | S::Running | S::Stopping, E::Stop) => Ok(S::Stopping),
        (S::Stopping, E::Halted) => Ok(S::Stopped),
        (_, E::Delete) => Ok(S::Deleting),
        _ => Err(Illegal { from, event }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATES: [Status; 7] = Status::ALL;
    const EVENTS: [Event; 7] = [
        Event::Launched,
        Event::Ready,
        Event::PoweredOff,
        Event::Failed,
        Event::Stop,
        Event::Halted,
        Event::Delete,
    ];

    /// Every state × event, written out: the table is the specification.
    #[test]
    fn every_transition_and_every_refusal() {
        use Status::*;
        let allowed = [
            (Creating, Event::Launched, Booting),
            (Stopped, Event::Launched, Booting),
            (Failed, Event::Launched, Booting),
            (Booting, Event::Ready, Running),
            (Booting, Event::PoweredOff, Stopped),
            (Running, Event::PoweredOff, Stopped),
            (Creating, Event::Failed, Failed),
            (Booting, Event::Failed, Failed),
            (Running, Event::Failed, Failed),
            (Stopped, Event::Failed, Failed),
            (Failed, Event::Failed, Failed),
            (Booting, Event::Stop, Stopping),
            (Running, Event::Stop, Stopping),
            (Stopping, Event::Stop, Stopping),
            (Stopping, Event::Halted, Stopped),
        ];
        for from in STATES {
            for event in EVENTS {
                let want = if event == Event::Delete {
                    Some(Deleting)
                } else {
                    allowed
                        .iter()
                        .find(|(f, e, _)| *f == from && *e == event)
                        .map(|(_, _, to)| *to)
                };
                match (next(from, event), want) {
                    (Ok(to), Some(w)) => assert_eq!(to, w, "{from:?} × {event:?}"),
                    (Err(e), None) => assert_eq!(e, Illegal { from, event }),
                    (got, want) => panic!("{from:?} × {event:?}: {got:?}, want {want:?}"),
                }
            }
        }
    }

    #[test]
    fn a_deleting_vm_only_goes_on_being_deleted_and_nothing_goes_back_to_creating() {
        for event in EVENTS {
            assert_eq!(
                next(Status::Deleting, event).is_ok(),
                event == Event::Delete,
                "{event:?}"
            );
            for from in STATES {
                assert_ne!(next(from, event), Ok(Status::Creating));
            }
        }
        let e = next(Status::Stopped, Event::Ready).unwrap_err();
        assert_eq!(e.to_string(), "a stopped VM cannot become ready");
    }
}
