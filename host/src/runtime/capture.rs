//! Captured guest output: a capped in-memory pipe for stdout/stderr that the host
//! drains after every call, so that a kept instance (`instances.reuse`) gets the
//! full `limits.max_output_bytes` per call, like a fresh one.

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
}

impl CapturePipe {
    /// An empty pipe taking at most `capacity` bytes until drained.
    pub(crate) fn new(capacity: usize) -> Self {
        CapturePipe {
            capacity,
            buffer: Arc::new(Mutex::new(BytesMut::new())),
        }
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
        let mut buffer = self.buffer();
        if bytes.len() > self.capacity - buffer.len() {
            return Err(StreamError::Trap(wasmtime::format_err!(
                "write beyond the output capture's capacity"
            )));
        }
        buffer.extend_from_slice(&bytes);
        Ok(())
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
        let mut buffer = self.buffer();
        let n = buf.len().min(self.capacity - buffer.len());
        buffer.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
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
        let mut pipe = CapturePipe::new(8);
        pipe.write(Bytes::from_static(b"12345678")).unwrap();
        assert!(matches!(pipe.check_write(), Err(StreamError::Closed)));
        assert!(pipe.write(Bytes::from_static(b"9")).is_err());
        assert_eq!(&pipe.take()[..], b"12345678");
        assert_eq!(pipe.len(), 0);
        assert_eq!(pipe.check_write().unwrap(), 8);
        pipe.write(Bytes::from_static(b"abc")).unwrap();
        assert_eq!(&pipe.take()[..], b"abc");
    }
}
