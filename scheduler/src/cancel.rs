//! A step's cancellation, as the model passes it to the routed experts
//! ([`StepContext`](tessera_model::experts::StepContext)): it fires when any
//! request of the step is cancelled or runs out of time, so a layer waiting
//! for experts stops at once.

use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use tessera_model::experts::Cancel;
use tokio_util::sync::CancellationToken;

/// A step's cancellation: fires when any of its requests is cancelled (Cancel,
/// the client gone, shutdown) or the earliest of their deadlines passes.
#[derive(Debug)]
pub struct AnyCancelled {
    tokens: Vec<CancellationToken>,
    deadline: Option<Instant>,
}

impl AnyCancelled {
    pub fn new(tokens: Vec<CancellationToken>) -> Self {
        Self {
            tokens,
            deadline: None,
        }
    }

    /// Also fires at `deadline`.
    pub fn with_deadline(mut self, deadline: Option<Instant>) -> Self {
        self.deadline = deadline;
        self
    }
}

impl Cancel for AnyCancelled {
    fn is_cancelled(&self) -> bool {
        self.tokens.iter().any(CancellationToken::is_cancelled)
            || self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// Needs a tokio runtime (for the deadline); the remote experts wait on theirs.
    fn cancelled(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let mut waits: Vec<_> = self
                .tokens
                .iter()
                .map(|t| Box::pin(t.cancelled()))
                .collect();
            let any = std::future::poll_fn(|cx| {
                if waits.iter_mut().any(|w| w.as_mut().poll(cx).is_ready()) {
                    std::task::Poll::Ready(())
                } else {
                    std::task::Poll::Pending
                }
            });
            match self.deadline {
                Some(d) => {
                    tokio::select! {
                        () = any => {}
                        () = tokio::time::sleep_until(d.into()) => {}
                    }
                }
                None => any.await,
            }
        })
    }
}
