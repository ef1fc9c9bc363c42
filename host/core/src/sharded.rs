//! Per-thread shards for the cache-hit path: a counter and a shared value that
//! concurrent readers on different cores update without writing to one cache
//! line (an atomic increment on a line another core holds costs a cross-core
//! transfer on every operation, and the hit path then stops scaling with cores).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// How many shards a [`Counter`] has of its own: twice the machine's
/// parallelism (the runtime's workers and a few other threads), 4 to 64.
pub fn shards() -> usize {
    static SHARDS: OnceLock<usize> = OnceLock::new();
    *SHARDS.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .saturating_mul(2)
            .clamp(4, 64)
    })
}

/// A thread's shard while it has none yet.
const UNASSIGNED: usize = usize::MAX;
/// A thread's shard when all are taken (or the thread is exiting): the shared
/// one, incremented atomically.
const SHARED: usize = usize::MAX - 1;

/// Shards given back by threads that ended.
static FREE: Mutex<Vec<usize>> = Mutex::new(Vec::new());

thread_local! {
    /// This thread's shard: below `shards()` it is this thread's alone.
    static INDEX: Cell<usize> = const { Cell::new(UNASSIGNED) };
    /// Gives this thread's shard back when the thread ends.
    static OWNER: Owner = const { Owner(Cell::new(SHARED)) };
}

struct Owner(Cell<usize>);

impl Drop for Owner {
    fn drop(&mut self) {
        let index = self.0.get();
        if index < shards() {
            // From now on (other thread-local destructors) this thread counts
            // on the shared shard, so the freed one has one writer again.
            // (If that ever failed, the shard is leaked rather than shared.)
            if INDEX.try_with(|i| i.set(SHARED)).is_ok() {
                FREE.lock().unwrap_or_else(|e| e.into_inner()).push(index);
            }
        }
    }
}

fn assign() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let index = FREE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .pop()
        .or_else(|| {
            NEXT.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < shards()).then_some(n + 1)
            })
            .ok()
        });
    // The shard is this thread's only if it can be given back when the thread
    // ends (its destructor registered); otherwise the shared one.
    match index {
        Some(index) if OWNER.try_with(|o| o.0.set(index)).is_ok() => index,
        Some(index) => {
            FREE.lock().unwrap_or_else(|e| e.into_inner()).push(index);
            SHARED
        }
        None => SHARED,
    }
}

/// This thread's shard: an index below `shards()` that no other running
/// thread has (threads take them in the order they first ask, and give them
/// back when they end), or [`SHARED`] once all are taken (a thread keeps the
/// shared one for its life, even after others gave theirs back).
#[inline]
pub fn shard() -> usize {
    INDEX.with(|i| {
        let mut v = i.get();
        if v == UNASSIGNED {
            v = assign();
            i.set(v);
        }
        v
    })
}

/// An `AtomicU64` alone on its cache lines (128 bytes: adjacent-line prefetch
/// pairs lines on x86).
#[repr(align(128))]
#[derive(Debug, Default)]
struct Padded(AtomicU64);

/// A counter that threads increment on their own shard; reads add the shards.
/// A thread's own shard has one writer, so an increment is a plain load and
/// store (no locked instruction); threads beyond the shards share one more,
/// incremented atomically.
#[derive(Debug)]
pub struct Counter {
    own: Box<[Padded]>,
    shared: Padded,
}

impl Default for Counter {
    fn default() -> Self {
        Counter {
            own: (0..shards()).map(|_| Padded::default()).collect(),
            shared: Padded::default(),
        }
    }
}

impl Counter {
    /// Add one.
    #[inline]
    pub fn incr(&self) {
        match self.own.get(shard()) {
            // This thread's alone: nobody else writes it.
            Some(cell) => cell.0.store(
                cell.0.load(Ordering::Relaxed).wrapping_add(1),
                Ordering::Relaxed,
            ),
            None => {
                self.shared.0.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The total (a sum of relaxed loads: exact once increments stop).
    pub fn get(&self) -> u64 {
        self.own
            .iter()
            .chain(std::iter::once(&self.shared))
            .fold(0u64, |n, c| n.wrapping_add(c.0.load(Ordering::Relaxed)))
    }
}

/// Copies a [`Replicated`] keeps besides its primary (threads of further shards
/// share them): inline, so a hit follows no pointer to find its copy. One less
/// than a power of two: a shard picks its copy with a mask, not a division.
const COPIES: usize = 7;
const _: () = assert!((COPIES + 1).is_power_of_two());

/// One value shared as `Arc<T>`, with a copy per shard made on first use there:
/// cloning the `Arc` writes to the reference count of this thread's copy only.
#[derive(Debug)]
pub struct Replicated<T> {
    primary: Arc<T>,
    copies: [OnceLock<Arc<T>>; COPIES],
}

impl<T: Clone> Replicated<T> {
    /// Share `value` (no copies made yet).
    pub fn new(value: Arc<T>) -> Self {
        Replicated {
            primary: value,
            copies: Default::default(),
        }
    }

    /// A clone of this thread's copy.
    #[inline]
    pub fn get(&self) -> Arc<T> {
        match shard() & COPIES {
            0 => self.primary.clone(),
            i => self.copies[i - 1]
                .get_or_init(|| Arc::new(T::clone(&self.primary)))
                .clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counter_adds_every_threads_increments() {
        let c = Arc::new(Counter::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || (0..1000).for_each(|_| c.incr()))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(c.get(), 4000);
    }

    /// More threads than shards, and threads that end and are replaced: no
    /// increment is lost (a shard never has two writers at once).
    #[test]
    fn a_counter_loses_nothing_with_more_threads_than_shards() {
        let c = Arc::new(Counter::default());
        let threads = shards() * 3;
        // Long enough for threads to overlap (a shard with two writers then
        // loses increments), bounded in total on many-core machines.
        let each = (12_000_000 / threads as u64).max(100_000);
        for _round in 0..3 {
            let running: Vec<_> = (0..threads)
                .map(|_| {
                    let c = c.clone();
                    std::thread::spawn(move || (0..each).for_each(|_| c.incr()))
                })
                .collect();
            running.into_iter().for_each(|t| t.join().unwrap());
        }
        assert_eq!(c.get(), 3 * threads as u64 * each);
    }

    #[test]
    fn every_threads_copy_equals_the_value() {
        let r = Arc::new(Replicated::new(Arc::new(String::from("token"))));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let r = r.clone();
                std::thread::spawn(move || (*r.get()).clone())
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), "token");
        }
    }
}
