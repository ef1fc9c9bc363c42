//! Per-call sandbox limits: the memory/table limiter wasmtime consults as the
//! guest grows, and the record of which limit a call hit (so that the error names
//! it, whatever the guest did afterwards).

use crate::error::LimitKind;
use std::sync::Mutex;

/// The first limit a call hit, with a detail for the error message.
#[derive(Debug, Default)]
pub(crate) struct CallHits(Mutex<Option<(LimitKind, String)>>);

impl CallHits {
    /// Record `kind` unless an earlier limit was already recorded.
    pub(crate) fn hit(&self, kind: LimitKind, detail: String) {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some((kind, detail));
        }
    }

    /// Forget the recorded limit (a kept instance starts its next call clean).
    pub(crate) fn clear(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The recorded limit, if any.
    pub(crate) fn get(&self) -> Option<(LimitKind, String)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Tables a plugin may grow to, in elements.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// Refuses linear-memory growth past the provider's cap (trapping the guest at once,
/// rather than letting `memory.grow` fail and the guest abort somewhere else) and
/// records the hit. The cap is for all of the Store's memories together (a
/// component with several memories does not get the cap for each).
pub(crate) struct CallLimiter {
    pub(crate) memory_bytes: usize,
    pub(crate) hits: std::sync::Arc<CallHits>,
    /// Bytes of linear memory the Store's memories hold together.
    pub(crate) used: usize,
}

impl wasmtime::ResourceLimiter for CallLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.used.saturating_add(desired.saturating_sub(current));
        if total > self.memory_bytes || maximum.is_some_and(|m| desired > m) {
            let detail = format!(
                "linear memory may not grow past {} MiB (from {} to {} bytes requested, {} bytes in all memories)",
                self.memory_bytes >> 20,
                current,
                desired,
                total
            );
            self.hits.hit(LimitKind::Memory, detail.clone());
            return Err(wasmtime::Error::msg(detail));
        }
        self.used = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > MAX_TABLE_ELEMENTS || maximum.is_some_and(|m| desired > m) {
            let detail = format!("tables may not grow past {MAX_TABLE_ELEMENTS} elements");
            self.hits.hit(LimitKind::Table, detail.clone());
            return Err(wasmtime::Error::msg(detail));
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review finding: each memory was checked on its own, so a component with k
    /// memories got k × `memory_mib`.
    #[test]
    fn the_memory_cap_covers_all_memories_together() {
        use wasmtime::ResourceLimiter as _;
        let hits = std::sync::Arc::new(CallHits::default());
        let mut limiter = CallLimiter {
            memory_bytes: 10 << 20,
            hits: hits.clone(),
            used: 0,
        };
        assert!(limiter.memory_growing(0, 6 << 20, None).unwrap());
        assert!(
            limiter.memory_growing(0, 6 << 20, None).is_err(),
            "second memory"
        );
        assert_eq!(hits.get().map(|(k, _)| k), Some(LimitKind::Memory));
        assert!(
            limiter.memory_growing(0, 4 << 20, None).unwrap(),
            "fits beside"
        );
        assert!(limiter.memory_growing(6 << 20, 7 << 20, None).is_err());
    }
}
