//! Group commit: a reply waits until its write is durable, and one flush makes every write made
//! before it durable, so concurrent callers share flushes instead of queueing behind them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use tokio::sync::{Notify, watch};

use crate::store::Store;

struct Shared {
    /// Sequence number of the latest applied write.
    written: AtomicU64,
    /// Wakes the flusher.
    wake: Notify,
}

/// Tracks which writes are durable; a background task flushes on demand.
pub struct Durability {
    shared: Arc<Shared>,
    durable: watch::Receiver<u64>,
}

impl Durability {
    /// Starts the flusher task for `store`; it ends when the store is dropped. Must be called
    /// inside a Tokio runtime.
    pub fn start(store: &Arc<dyn Store>) -> Durability {
        let (tx, rx) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            written: AtomicU64::new(0),
            wake: Notify::new(),
        });
        tokio::spawn(flusher(Arc::downgrade(store), shared.clone(), tx));
        Durability {
            shared,
            durable: rx,
        }
    }

    /// Records that a write was applied and returns its sequence number for
    /// [`Durability::wait`]. Call it after the write, under the lock that ordered it.
    pub fn record(&self) -> u64 {
        self.shared.written.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// The sequence number of the latest write: a reader waits for it so that it never reports
    /// what a crash could still undo.
    pub fn latest(&self) -> u64 {
        self.shared.written.load(Ordering::Acquire)
    }

    /// Waits until write `seq` and every earlier one are durable.
    pub async fn wait(&self, seq: u64) {
        if *self.durable.borrow() >= seq {
            return;
        }
        self.shared.wake.notify_one();
        let mut rx = self.durable.clone();
        // The sender lives as long as the flusher, which outlives every caller holding the store.
        let _ = rx.wait_for(|d| *d >= seq).await;
    }
}

async fn flusher(store: Weak<dyn Store>, shared: Arc<Shared>, durable: watch::Sender<u64>) {
    loop {
        shared.wake.notified().await;
        loop {
            let target = shared.written.load(Ordering::Acquire);
            if target <= *durable.borrow() {
                break;
            }
            let Some(store) = store.upgrade() else { return };
            match tokio::task::spawn_blocking(move || store.flush()).await {
                Ok(Ok(())) => {
                    durable.send_replace(target);
                }
                failure => {
                    // Memory is ahead of the disk and the disk refuses: the only safe course is
                    // to stop, so that a restart serves exactly what is durable.
                    tracing::error!("flushing the store failed ({failure:?}); exiting");
                    std::process::exit(70);
                }
            }
        }
    }
}
