//! Routed experts on expert-workers: one `Forward` per worker per MoE layer, all
//! workers concurrently, partial sums scattered back into one accumulator.
//!
//! The model calls [`ExpertBackend::forward`] synchronously from its own thread;
//! the calls run on a tokio runtime through its [`Handle`]. Never call it from
//! inside that runtime (it blocks on the handle).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Tensor};
use prost::Message;
use tessera_model::experts::{ExpertBackend, ExpertRoute};
use tessera_model::{Error, Result};
use tessera_proto::internal::v1::ForwardRequest;
use tessera_proto::internal::v1::expert_client::ExpertClient;
use tessera_proto::tensor;
use tessera_runtime::placement::Placement;
use tokio::runtime::Handle;
use tonic::transport::Channel;

/// One worker's share of a layer's batch: the batch rows it needs (each once, in
/// ascending order; local row `i` is batch row `rows[i]`) and its routes, whose
/// `row` indexes `rows`.
#[derive(Debug, Clone, PartialEq)]
struct WorkerBatch {
    rows: Vec<u32>,
    routes: Vec<ExpertRoute>,
}

/// Splits `routes` by owning worker (the first owner of each expert that has a
/// client) and re-indexes each worker's rows.
fn plan<'p>(
    placement: &'p Placement,
    live: impl Fn(&str) -> bool,
    layer: usize,
    routes: &[ExpertRoute],
) -> Result<BTreeMap<&'p str, WorkerBatch>> {
    let mut owner_of: BTreeMap<u32, &'p str> = BTreeMap::new();
    let mut by_worker: BTreeMap<&'p str, Vec<ExpertRoute>> = BTreeMap::new();
    for r in routes {
        let owner = match owner_of.get(&r.expert) {
            Some(&w) => w,
            None => {
                let w = placement
                    .owners(layer, r.expert as usize)
                    .into_iter()
                    .find(|w| live(w))
                    .ok_or_else(|| {
                        Error::Experts(format!(
                            "no live owner for layer {layer} expert {}",
                            r.expert
                        ))
                    })?;
                owner_of.insert(r.expert, w);
                w
            }
        };
        by_worker.entry(owner).or_default().push(*r);
    }
    Ok(by_worker
        .into_iter()
        .map(|(worker, routes)| {
            let mut rows: Vec<u32> = routes.iter().map(|r| r.row).collect();
            rows.sort_unstable();
            rows.dedup();
            let local: BTreeMap<u32, u32> = rows
                .iter()
                .enumerate()
                .map(|(i, &r)| (r, i as u32))
                .collect();
            let routes = routes
                .into_iter()
                .map(|r| ExpertRoute {
                    row: local[&r.row],
                    ..r
                })
                .collect();
            (worker, WorkerBatch { rows, routes })
        })
        .collect())
}

/// Routed experts computed by expert-workers over gRPC, placed by a [`Placement`].
pub struct RemoteExperts {
    placement: Placement,
    clients: BTreeMap<String, ExpertClient<Channel>>,
    handle: Handle,
    fingerprint: String,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
}

impl std::fmt::Debug for RemoteExperts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteExperts")
            .field("placement_version", &self.placement.version)
            .field("workers", &self.clients.keys().collect::<Vec<_>>())
            .field("bytes_sent", &self.bytes_sent())
            .field("bytes_received", &self.bytes_received())
            .finish_non_exhaustive()
    }
}

impl RemoteExperts {
    /// A backend sending each expert's routes to its first owner in `placement`
    /// that has a client in `clients` (worker id → connected client, limits set
    /// to `MAX_MESSAGE_BYTES`). Requests carry `fingerprint` and run on `handle`.
    pub fn new(
        placement: Placement,
        clients: BTreeMap<String, ExpertClient<Channel>>,
        handle: Handle,
        fingerprint: impl Into<String>,
    ) -> Self {
        Self {
            placement,
            clients,
            handle,
            fingerprint: fingerprint.into(),
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
        }
    }

    /// Encoded bytes of every `ForwardRequest` sent so far.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent.load(Ordering::Relaxed)
    }

    /// Encoded bytes of every `ForwardResponse` received so far.
    pub fn bytes_received(&self) -> u64 {
        self.bytes_received.load(Ordering::Relaxed)
    }

    /// The request for one worker's share of `xs`.
    fn request(&self, layer: usize, xs: &Tensor, batch: &WorkerBatch) -> Result<ForwardRequest> {
        let n = batch.rows.len();
        let idx = Tensor::from_vec(batch.rows.clone(), n, xs.device())?;
        let rows = xs.index_select(&idx, 0)?; // (n, hidden)
        let rows = tensor::encode(&rows).map_err(|e| Error::Experts(e.to_string()))?;
        Ok(ForwardRequest {
            model_fingerprint: self.fingerprint.clone(),
            layer: layer as u32,
            rows: Some(rows),
            route_rows: batch.routes.iter().map(|r| r.row).collect(),
            route_experts: batch.routes.iter().map(|r| r.expert).collect(),
            route_weights: batch.routes.iter().map(|r| r.weight).collect(),
        })
    }
}

impl ExpertBackend for RemoteExperts {
    fn forward(&self, layer: usize, xs: &Tensor, routes: &[ExpertRoute]) -> Result<Tensor> {
        let (n_rows, hidden) = xs.dims2()?;
        let batches = plan(
            &self.placement,
            |w| self.clients.contains_key(w),
            layer,
            routes,
        )?;

        let mut calls = Vec::with_capacity(batches.len());
        for (worker, batch) in &batches {
            let req = self.request(layer, xs, batch)?;
            self.bytes_sent
                .fetch_add(req.encoded_len() as u64, Ordering::Relaxed);
            let mut client = self.clients[*worker].clone();
            calls.push(
                self.handle
                    .spawn(async move { client.forward(req).await.map(|r| r.into_inner()) }),
            );
        }
        let responses = self.handle.block_on(async {
            let mut out = Vec::with_capacity(calls.len());
            for call in calls {
                out.push(call.await);
            }
            out
        });

        let mut acc = Tensor::zeros((n_rows, hidden), DType::F32, xs.device())?;
        for ((worker, batch), response) in batches.iter().zip(responses) {
            let response = response
                .map_err(|e| Error::Experts(format!("expert-worker {worker}: task failed: {e}")))?
                .map_err(|s| {
                    Error::Experts(format!(
                        "expert-worker {worker}: {:?}: {}",
                        s.code(),
                        s.message()
                    ))
                })?;
            self.bytes_received
                .fetch_add(response.encoded_len() as u64, Ordering::Relaxed);
            let sums = response.sums.as_ref().ok_or_else(|| {
                Error::Experts(format!("expert-worker {worker}: response without sums"))
            })?;
            let sums = tensor::decode(sums, xs.device())
                .map_err(|e| Error::Experts(format!("expert-worker {worker}: {e}")))?
                .to_dtype(DType::F32)?;
            if sums.dims() != [batch.rows.len(), hidden] {
                return Err(Error::Experts(format!(
                    "expert-worker {worker}: sums have shape {:?}, expected [{}, {hidden}]",
                    sums.dims(),
                    batch.rows.len()
                )));
            }
            let idx = Tensor::from_vec(batch.rows.clone(), batch.rows.len(), xs.device())?;
            acc = acc.index_add(&idx, &sums, 0)?;
        }
        Ok(acc.to_dtype(xs.dtype())?)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn placement() -> Placement {
        let workers: Vec<String> = vec!["a".into(), "b".into()];
        tessera_runtime::placement::even_split(1, &[1, 2], 4, &workers).unwrap()
    }

    fn route(row: u32, expert: u32) -> ExpertRoute {
        ExpertRoute {
            row,
            expert,
            weight: 0.5,
        }
    }

    #[test]
    fn each_worker_gets_its_rows_once_reindexed() {
        let p = placement();
        // Experts 0, 1 live on "a", 2, 3 on "b".
        let routes = [
            route(0, 0),
            route(0, 3),
            route(2, 1),
            route(2, 0),
            route(5, 2),
        ];
        let got = plan(&p, |_| true, 1, &routes).unwrap();
        assert_eq!(
            got["a"],
            WorkerBatch {
                rows: vec![0, 2],
                routes: vec![route(0, 0), route(1, 1), route(1, 0)],
            }
        );
        assert_eq!(
            got["b"],
            WorkerBatch {
                rows: vec![0, 5],
                routes: vec![route(0, 3), route(1, 2)],
            }
        );
    }

    #[test]
    fn a_worker_without_routes_gets_no_request() {
        let p = placement();
        let got = plan(&p, |_| true, 2, &[route(0, 1)]).unwrap();
        assert_eq!(got.keys().copied().collect::<BTreeSet<_>>(), ["a"].into());
    }

    #[test]
    fn an_expert_without_a_live_owner_is_an_error() {
        let p = placement();
        let err = plan(&p, |w| w != "b", 1, &[route(0, 3)]).unwrap_err();
        assert!(
            err.to_string()
                .contains("no live owner for layer 1 expert 3"),
            "{err}"
        );
    }
}
