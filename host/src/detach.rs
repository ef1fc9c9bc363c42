//! A fetch that its caller drives and that outlives its caller.
//!
//! A fetch must never be cut in half by a caller that goes away (a client that
//! disconnects, a timeout around `get_credentials`, a sidecar shutting down): say,
//! after the identity provider rotated a refresh token and before the provider
//! saved it. Spawning every fetch on its own task guarantees that, but costs a
//! hop between threads on every miss (a wake-up of another worker, the result
//! handed back through the task's join handle): about a fifth of a fresh miss's
//! time. [`Detached`] gives the same guarantee without the hop: the caller polls
//! the fetch itself, and only when the caller drops it unfinished is the rest
//! handed to a task of its own on the runtime it started on.

use std::any::Any;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::{Context, Poll};

/// `future`, polled by whoever polls this, finished on its own task if this is
/// dropped before it completes. Its output is `Err` with the panic's payload if
/// the future panicked (as a spawned task's join handle would report it).
pub(crate) struct Detached<F: Future + Send + 'static>
where
    F::Output: Send + 'static,
{
    future: Option<Pin<Box<F>>>,
    runtime: tokio::runtime::Handle,
}

impl<F: Future + Send + 'static> Detached<F>
where
    F::Output: Send + 'static,
{
    /// Wrap `future`. Panics outside a tokio runtime, as `tokio::spawn` does.
    pub(crate) fn new(future: F) -> Self {
        Detached {
            future: Some(Box::pin(future)),
            runtime: tokio::runtime::Handle::current(),
        }
    }
}

impl<F: Future + Send + 'static> Future for Detached<F>
where
    F::Output: Send + 'static,
{
    type Output = Result<F::Output, Box<dyn Any + Send>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let future = self
            .future
            .as_mut()
            .expect("a Detached future polled after it completed");
        // A panic is contained here as it was in a task of its own: the caller
        // gets an error, the runtime's worker goes on.
        let polled = catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx)));
        match polled {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(output)) => {
                self.future = None;
                Poll::Ready(Ok(output))
            }
            Err(panic) => {
                self.future = None;
                Poll::Ready(Err(panic))
            }
        }
    }
}

impl<F: Future + Send + 'static> Drop for Detached<F>
where
    F::Output: Send + 'static,
{
    fn drop(&mut self) {
        if let Some(future) = self.future.take() {
            // Unfinished: the rest runs on its own task. A runtime that is
            // shutting down drops it, as it drops every other task it holds.
            drop(self.runtime.spawn(future));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn a_fetch_dropped_by_its_caller_runs_to_its_end() {
        let finished = Arc::new(AtomicBool::new(false));
        let flag = finished.clone();
        let fetch = Detached::new(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            flag.store(true, Ordering::SeqCst);
        });
        // The caller gives up after its first poll.
        assert!(
            tokio::time::timeout(Duration::from_millis(1), fetch)
                .await
                .is_err()
        );
        for _ in 0..200 {
            if finished.load(Ordering::SeqCst) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the dropped fetch never finished");
    }

    #[tokio::test]
    async fn a_completed_fetch_is_not_run_again_and_a_panic_is_an_error() {
        assert_eq!(Detached::new(async { 7 }).await.unwrap(), 7);
        let panicked = Detached::new(async { panic!("boom") }).await;
        let payload = panicked.expect_err("the panic is reported");
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"boom"));
    }
}
