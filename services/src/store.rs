//! Opening a daemon's sled store.

use std::path::Path;
use std::time::{Duration, Instant};

/// How long a busy store is waited for.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Opens (or creates) the sled store at `path` with a cache of `cache` bytes. The lock of a
/// store whose daemon was just killed can still be held for a moment: by its exiting process,
/// or by a child it was starting (between fork and exec a child holds every descriptor of its
/// parent), so a busy lock is waited for up to 10 s.
pub fn open_sled(path: &Path, cache: u64) -> Result<sled::Db, String> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match sled::Config::new().path(path).cache_capacity(cache).open() {
            Ok(db) => return Ok(db),
            // sled says so only in words.
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(format!("opening {}: {e}", path.display())),
        }
    }
}
