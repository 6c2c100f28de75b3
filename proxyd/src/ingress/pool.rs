//! The ingress's kept connections to workloads.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::splice::Socket;

/// Idle connections kept per VM.
const POOL_PER_VM: usize = 32;

/// One ingress thread's idle connections to workloads, per VM (registered with that thread's
/// runtime, so never shared with another; the lock, never contended, only makes tasks `Send`).
#[derive(Default)]
pub(super) struct Pool(Mutex<HashMap<String, Vec<Socket>>>);

impl Pool {
    /// An idle connection to `vm`'s workload that is still open.
    pub(super) fn take(&self, vm: &str) -> Option<Socket> {
        let mut idle = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(vm)?;
        while let Some(s) = list.pop() {
            if s.idle_and_open() {
                return Some(s);
            }
        }
        None
    }

    /// Keeps a connection that finished an exchange for the next request.
    pub(super) fn give_back(&self, vm: &str, s: Socket) {
        let mut idle = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(vm.to_string()).or_default();
        if list.len() < POOL_PER_VM {
            list.push(s);
        }
    }

    /// Drops the idle connections of a VM that is gone.
    pub(super) fn forget(&self, vm: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(vm);
    }
}
