//! Per-thread shards for the cache-hit path: a counter and a shared value that
//! concurrent readers on different cores update without writing to one cache
//! line (an atomic increment on a line another core holds costs a cross-core
//! transfer on every operation, and the hit path then stops scaling with cores).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// How many shards: the machine's parallelism (a thread index picks one), at
/// most 64.
pub fn shards() -> usize {
    static SHARDS: OnceLock<usize> = OnceLock::new();
    *SHARDS.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 64)
    })
}

/// This thread's shard in `0..shards()` (threads take shards round-robin in the
/// order they first ask).
#[inline]
pub fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    INDEX.with(|i| {
        let mut v = i.get();
        if v == usize::MAX {
            v = NEXT.fetch_add(1, Ordering::Relaxed) % shards();
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
#[derive(Debug)]
pub struct Counter(Box<[Padded]>);

impl Default for Counter {
    fn default() -> Self {
        Counter((0..shards()).map(|_| Padded::default()).collect())
    }
}

impl Counter {
    /// Add one.
    #[inline]
    pub fn incr(&self) {
        // `shard()` is below `shards()`, this counter's length: no modulo (an
        // integer division costs more than the rest of the increment).
        let shard = shard();
        debug_assert!(shard < self.0.len(), "a shard beyond the counter");
        if let Some(cell) = self.0.get(shard) {
            cell.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The total (a sum of relaxed loads: exact once increments stop).
    pub fn get(&self) -> u64 {
        self.0
            .iter()
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
