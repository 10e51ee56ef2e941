//! [`RemoteExperts`] seen from one request: its `Forward` calls carry the
//! request id and stop when the request is cancelled, and the scheduler error
//! behind a failed layer is kept (the model only passes a message through).

use std::sync::{Mutex, PoisonError};

use candle_core::Tensor;
use tessera_model::experts::{ExpertBackend, ExpertRoute};
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::remote_experts::RemoteExperts;

/// [`RemoteExperts`] for one request: its calls carry the request id, stop when
/// it is cancelled, and the scheduler error behind a failure is kept for
/// [`RequestExperts::take_failure`] (the model only sees a message).
pub struct RequestExperts<'a> {
    remote: &'a RemoteExperts,
    request_id: &'a str,
    cancel: &'a CancellationToken,
    failure: Mutex<Option<Error>>,
}

impl<'a> RequestExperts<'a> {
    pub fn new(
        remote: &'a RemoteExperts,
        request_id: &'a str,
        cancel: &'a CancellationToken,
    ) -> Self {
        Self {
            remote,
            request_id,
            cancel,
            failure: Mutex::new(None),
        }
    }

    /// The scheduler error of the last failed layer, if any.
    pub fn take_failure(&self) -> Option<Error> {
        self.failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

impl ExpertBackend for RequestExperts<'_> {
    fn forward(
        &self,
        layer: usize,
        xs: &Tensor,
        routes: &[ExpertRoute],
    ) -> tessera_model::Result<Tensor> {
        self.remote
            .forward_layer(layer, xs, routes, Some(self.request_id), Some(self.cancel))
            .map_err(|e| {
                let message = tessera_model::Error::Experts(e.to_string());
                *self.failure.lock().unwrap_or_else(PoisonError::into_inner) = Some(e);
                message
            })
    }
}
