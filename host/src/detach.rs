//! A fetch that starts on its caller's task and outlives its caller.
//!
//! A fetch must never be cut in half by a caller that goes away (a client that
//! disconnects, a timeout around `get_credentials`, a sidecar shutting down): say,
//! after the identity provider rotated a refresh token and before the provider
//! saved it. Nor may it stall because its caller stopped polling without
//! dropping it (a `select!` busy in another branch, a slow stream consumer): it
//! may hold its provider's state, a call slot and the key's single-flight lock.
//! Spawning every fetch on its own task guarantees both, but costs a hop between
//! threads on every miss (a wake-up of another worker, the result handed back
//! through the task's join handle): about two fifths of a fresh `static` miss.
//!
//! [`Detached`] keeps both guarantees and saves the hop where it matters: the
//! caller polls the fetch once itself; a fetch that completes in that poll (a
//! provider with nothing to wait for: no I/O, no lock held by someone else) never
//! leaves the caller's task. One that has to wait continues on a task of its own,
//! which the caller then awaits, as before.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::task::JoinHandle;

/// How a fetch ended without an output.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Abnormal {
    /// It panicked. Its message went to stderr through the panic hook and is
    /// not repeated here: a panic message can quote the data it choked on (a
    /// slice of a token), and this error reaches clients and logs.
    Panicked,
    /// Its task was cancelled: the runtime is shutting down.
    Cancelled,
}

impl std::fmt::Display for Abnormal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Abnormal::Panicked => {
                "the fetch panicked (a defect in reauth; its message is on the process's stderr)"
            }
            Abnormal::Cancelled => "the fetch was cancelled (shutting down)",
        })
    }
}

/// `future`, polled first by whoever polls this and, from its first `Pending`
/// on, on a task of its own; never cut off by dropping this.
pub(crate) struct Detached<F: Future + Send + 'static>
where
    F::Output: Send + 'static,
{
    state: State<F>,
    runtime: tokio::runtime::Handle,
}

enum State<F: Future> {
    /// Not polled yet.
    Inline(Pin<Box<F>>),
    /// Waiting on its own task.
    Spawned(JoinHandle<F::Output>),
    Done,
}

impl<F: Future + Send + 'static> Detached<F>
where
    F::Output: Send + 'static,
{
    /// Wrap `future`. Panics outside a tokio runtime, as `tokio::spawn` does.
    pub(crate) fn new(future: F) -> Self {
        Detached {
            state: State::Inline(Box::pin(future)),
            runtime: tokio::runtime::Handle::current(),
        }
    }
}

impl<F: Future + Send + 'static> Future for Detached<F>
where
    F::Output: Send + 'static,
{
    type Output = Result<F::Output, Abnormal>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let State::Inline(future) = &mut this.state {
            // A panic is contained here as it is in a task of its own: the
            // caller gets an error, the runtime's worker goes on.
            match catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx))) {
                Ok(Poll::Ready(output)) => {
                    this.state = State::Done;
                    return Poll::Ready(Ok(output));
                }
                Err(_panic) => {
                    this.state = State::Done;
                    return Poll::Ready(Err(Abnormal::Panicked));
                }
                Ok(Poll::Pending) => {
                    let State::Inline(future) = std::mem::replace(&mut this.state, State::Done)
                    else {
                        unreachable!("matched above")
                    };
                    this.state = State::Spawned(this.runtime.spawn(future));
                }
            }
        }
        match &mut this.state {
            State::Spawned(task) => match Pin::new(task).poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(joined) => {
                    this.state = State::Done;
                    Poll::Ready(joined.map_err(|e| {
                        if e.is_panic() {
                            Abnormal::Panicked
                        } else {
                            Abnormal::Cancelled
                        }
                    }))
                }
            },
            _ => panic!("a Detached future polled after it completed"),
        }
    }
}

impl<F: Future + Send + 'static> Drop for Detached<F>
where
    F::Output: Send + 'static,
{
    fn drop(&mut self) {
        // Never polled: it runs on its own task (as a spawned fetch always did).
        // A spawned one goes on without its join handle. A runtime that is
        // shutting down drops it, as it drops every other task it holds.
        if let State::Inline(future) = std::mem::replace(&mut self.state, State::Done) {
            drop(self.runtime.spawn(future));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    /// Wait (bounded) until `done` is set.
    async fn until(done: &AtomicBool) -> bool {
        for _ in 0..200 {
            if done.load(Ordering::SeqCst) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

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
        assert!(until(&finished).await, "the dropped fetch never finished");
    }

    #[tokio::test]
    async fn a_fetch_never_polled_still_runs() {
        let finished = Arc::new(AtomicBool::new(false));
        let flag = finished.clone();
        drop(Detached::new(async move {
            flag.store(true, Ordering::SeqCst);
        }));
        assert!(until(&finished).await, "the unpolled fetch never ran");
    }

    /// A caller that keeps the future but stops polling it (busy in another
    /// branch of a `select!`) does not stall a fetch that had to wait.
    #[tokio::test]
    async fn a_fetch_that_waits_goes_on_without_its_caller_polling() {
        let finished = Arc::new(AtomicBool::new(false));
        let flag = finished.clone();
        let mut fetch = Box::pin(Detached::new(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            flag.store(true, Ordering::SeqCst);
            7
        }));
        assert!(
            futures_poll_once(fetch.as_mut()).is_pending(),
            "it has to wait"
        );
        assert!(until(&finished).await, "the fetch stalled with its caller");
        assert_eq!(fetch.await.unwrap(), 7);
    }

    /// A fetch with nothing to wait for completes in its caller's poll: it
    /// never becomes a task of its own.
    #[tokio::test(flavor = "current_thread")]
    async fn a_fetch_that_need_not_wait_stays_on_its_callers_task() {
        let polls = Arc::new(AtomicUsize::new(0));
        let counted = polls.clone();
        let fetch = Detached::new(async move {
            counted.fetch_add(1, Ordering::SeqCst);
            5
        });
        let mut fetch = std::pin::pin!(fetch);
        match futures_poll_once(fetch.as_mut()) {
            Poll::Ready(v) => assert_eq!(v.unwrap(), 5),
            Poll::Pending => panic!("a ready fetch was spawned"),
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_panic_is_an_error_without_its_message_inline_or_spawned() {
        let inline = Detached::new(async { panic!("boom secret-token-1") }).await;
        assert_eq!(inline.unwrap_err(), Abnormal::Panicked);
        let spawned = Detached::new(async {
            tokio::time::sleep(Duration::from_millis(1)).await;
            panic!("late secret-token-{}", 2)
        })
        .await;
        let abnormal = spawned.unwrap_err();
        assert_eq!(abnormal, Abnormal::Panicked);
        assert!(!abnormal.to_string().contains("secret"), "{abnormal}");
    }

    #[test]
    fn a_fetch_cut_by_the_runtime_shutting_down_is_cancelled() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        // Created and polled (spawned at its first `Pending`) in the runtime.
        let mut fetch = {
            let _entered = runtime.enter();
            let mut fetch = Box::pin(Detached::new(std::future::pending::<()>()));
            assert!(futures_poll_once(fetch.as_mut()).is_pending());
            fetch
        };
        drop(runtime);
        assert_eq!(
            futures_poll_once(fetch.as_mut()),
            Poll::Ready(Err(Abnormal::Cancelled))
        );
    }

    fn futures_poll_once<F: Future>(future: Pin<&mut F>) -> Poll<F::Output> {
        future.poll(&mut Context::from_waker(std::task::Waker::noop()))
    }
}
