//! Captured guest output: a capped in-memory pipe for stdout/stderr that the host
//! drains after every call, so that a kept instance (`instances.reuse`) gets the
//! full `limits.max_output_bytes` per call, like a fresh one.
//!
//! The pipe keeps exactly the first `limits.max_output_bytes` bytes (a write that
//! does not fit is cut at the cap, not dropped whole) and records the hit in the
//! call's [`CallHits`], so the call's error names `limits.max_output_bytes`
//! whatever the guest makes of the failed write.

use super::limiter::CallHits;
use crate::error::LimitKind;
use bytes::{Bytes, BytesMut};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// A capped in-memory output pipe. Clones share the buffer.
#[derive(Debug, Clone)]
pub(crate) struct CapturePipe {
    capacity: usize,
    buffer: Arc<Mutex<BytesMut>>,
    hits: Arc<CallHits>,
}

impl CapturePipe {
    /// An empty pipe taking at most `capacity` bytes until drained; a write past
    /// it is recorded in `hits`.
    pub(crate) fn new(capacity: usize, hits: Arc<CallHits>) -> Self {
        CapturePipe {
            capacity,
            buffer: Arc::new(Mutex::new(BytesMut::new())),
            hits,
        }
    }

    /// Append what fits of `bytes`; `false` (and the hit recorded) if not all did.
    fn append(&self, bytes: &[u8]) -> bool {
        let mut buffer = self.buffer();
        let room = self.capacity.saturating_sub(buffer.len());
        let n = bytes.len().min(room);
        buffer.extend_from_slice(&bytes[..n]);
        if n < bytes.len() {
            drop(buffer);
            self.full();
            return false;
        }
        true
    }

    fn full(&self) {
        self.hits.hit(
            LimitKind::Output,
            format!(
                "the plugin wrote more than {} bytes to stdout/stderr",
                self.capacity
            ),
        );
    }

    fn buffer(&self) -> std::sync::MutexGuard<'_, BytesMut> {
        self.buffer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes written since the last [`CapturePipe::take`].
    pub(crate) fn len(&self) -> usize {
        self.buffer().len()
    }

    /// Everything written since the last call, emptying the pipe.
    pub(crate) fn take(&self) -> Bytes {
        self.buffer().split().freeze()
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for CapturePipe {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        if self.append(&bytes) {
            Ok(())
        } else {
            Err(StreamError::Closed)
        }
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        let used = self.buffer().len();
        if used < self.capacity {
            Ok(self.capacity - used)
        } else {
            // Full: nothing more fits in this call.
            self.full();
            Err(StreamError::Closed)
        }
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CapturePipe {
    async fn ready(&mut self) {}
}

impl AsyncWrite for CapturePipe {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let before = self.len();
        self.append(buf);
        Poll::Ready(Ok(self.len() - before))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl IsTerminal for CapturePipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CapturePipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_applies_between_drains() {
        let hits = Arc::new(CallHits::default());
        let mut pipe = CapturePipe::new(8, hits.clone());
        pipe.write(Bytes::from_static(b"12345678")).unwrap();
        assert_eq!(hits.get(), None);
        assert!(matches!(pipe.check_write(), Err(StreamError::Closed)));
        assert_eq!(hits.get().map(|(k, _)| k), Some(LimitKind::Output));
        assert!(pipe.write(Bytes::from_static(b"9")).is_err());
        assert_eq!(&pipe.take()[..], b"12345678");
        assert_eq!(pipe.len(), 0);
        assert_eq!(pipe.check_write().unwrap(), 8);
        pipe.write(Bytes::from_static(b"abc")).unwrap();
        assert_eq!(&pipe.take()[..], b"abc");
    }

    /// Regression: a write that did not fit was dropped whole, so the capture
    /// stopped up to a chunk short of the cap (196,608 of 262,144 bytes) and the
    /// hit was not recorded (the call came back as the plugin's own `unavailable`).
    #[test]
    fn an_overflowing_write_is_cut_at_the_cap_and_recorded() {
        let hits = Arc::new(CallHits::default());
        let mut pipe = CapturePipe::new(10, hits.clone());
        pipe.write(Bytes::from_static(b"123456")).unwrap();
        assert!(pipe.write(Bytes::from_static(b"789abc")).is_err());
        assert_eq!(&pipe.take()[..], b"123456789a");
        let (kind, detail) = hits.get().unwrap();
        assert_eq!(kind, LimitKind::Output);
        assert!(detail.contains("10 bytes"), "{detail}");
    }
}
