//! Group commit: a reply waits until its write is durable, and one flush makes every write made
//! before it durable, so concurrent callers share flushes. A waiter whose write is not yet
//! covered and finds no flush under way becomes the leader and flushes on its own thread (no
//! hand-off to another task); the others sleep until that flush ends and are all woken at once,
//! most of them finding their write covered.

use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::Notify;

/// Makes every write applied so far durable (e.g. a sled flush). It blocks.
pub type Flush = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Tracks which writes are durable and flushes on demand.
pub struct Durability {
    flush: Flush,
    /// Sequence number of the latest applied write.
    written: AtomicU64,
    /// Sequence number up to which every write is durable.
    durable: AtomicU64,
    /// Whether a leader is flushing.
    flushing: AtomicBool,
    /// Wakes every waiter when a flush ends.
    flushed: Notify,
}

impl Durability {
    /// Tracks the writes that `flush` makes durable.
    pub fn new(flush: Flush) -> Durability {
        Durability {
            flush,
            written: AtomicU64::new(0),
            durable: AtomicU64::new(0),
            flushing: AtomicBool::new(false),
            flushed: Notify::new(),
        }
    }

    /// Records that a write was applied and returns its sequence number for
    /// [`Durability::wait`]. Call it after the write, under the lock that ordered it.
    pub fn record(&self) -> u64 {
        self.written.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// The sequence number of the latest write: a reader waits for it so that it never reports
    /// what a crash could still undo.
    pub fn latest(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }

    fn covered(&self, seq: u64) -> bool {
        self.durable.load(Ordering::Acquire) >= seq
    }

    /// Waits until write `seq` and every earlier one are durable. Needs the multi-threaded Tokio
    /// runtime: the leader's flush blocks its worker in place.
    pub async fn wait(&self, seq: u64) {
        while !self.covered(seq) {
            if !self.flushing.swap(true, Ordering::AcqRel) {
                self.flush_now();
                continue;
            }
            let mut ended = pin!(self.flushed.notified());
            ended.as_mut().enable();
            // Re-check after registering, so that a flush ending in between is not missed.
            if self.covered(seq) || !self.flushing.load(Ordering::Acquire) {
                continue;
            }
            ended.await;
        }
    }

    /// The leader's flush: everything written so far becomes durable. A failing flush ends the
    /// process: memory is ahead of the disk and the disk refuses, so the only safe course is a
    /// restart that serves exactly what is durable.
    fn flush_now(&self) {
        let target = self.written.load(Ordering::Acquire);
        if let Err(e) = tokio::task::block_in_place(|| (self.flush)()) {
            tracing::error!("flushing the store failed ({e}); exiting");
            std::process::exit(70);
        }
        self.durable.fetch_max(target, Ordering::AcqRel);
        self.flushing.store(false, Ordering::Release);
        self.flushed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_flush_covers_every_write_recorded_before_it() {
        let flushes = Arc::new(AtomicUsize::new(0));
        let counted = flushes.clone();
        let durability = Arc::new(Durability::new(Box::new(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(20));
            Ok(())
        })));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let d = durability.clone();
            tasks.push(tokio::spawn(async move {
                let seq = d.record();
                d.wait(seq).await
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let after_writes = flushes.load(Ordering::SeqCst);
        assert!(
            (1..=10).contains(&after_writes),
            "{after_writes} flushes for 50 writes"
        );
        // Nothing written since: no further flush.
        durability.wait(durability.latest()).await;
        assert_eq!(flushes.load(Ordering::SeqCst), after_writes);
    }
}
