//! One MoE layer's routes split into one batch per expert-worker: each worker
//! gets the rows it needs once, re-indexed, and its `(row, expert, weight)`
//! routes (`docs/ARCHITECTURE.md`, "Expert dispatch"); and reading a worker's answer:
//! its sums checked, its errors sorted into "a newer routing table may fix it"
//! and "final".

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use tessera_model::experts::ExpertRoute;
use tessera_proto::internal::v1::ForwardResponse;
use tessera_proto::tensor;
use tessera_runtime::placement::Placement;

use crate::error::Error;

/// One worker's share of a layer's batch: the batch rows it needs (each once, in
/// ascending order; local row `i` is batch row `rows[i]`) and its routes, whose
/// `row` indexes `rows`.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerBatch {
    pub rows: Vec<u32>,
    pub routes: Vec<ExpertRoute>,
}

impl WorkerBatch {
    /// The routes with `row` back in the layer's batch numbering.
    pub fn global_routes(&self) -> impl Iterator<Item = ExpertRoute> + '_ {
        self.routes.iter().map(|r| ExpertRoute {
            row: self.rows[r.row as usize],
            ..*r
        })
    }
}

/// Which replica of `(layer, expert)` serves it: among the owners that are
/// `usable` (have a client, not excluded), those `preferred` (not suspected of
/// being down) if any, and among those one fixed by the expert, so that the
/// replicas of a layer's experts share its load and the same expert goes to the
/// same worker from step to step (the sums then add up in the same order).
fn pick<'p>(
    placement: &'p Placement,
    usable: &impl Fn(&str) -> bool,
    preferred: &impl Fn(&str) -> bool,
    layer: usize,
    expert: usize,
) -> Option<&'p str> {
    let owners: Vec<&str> = placement
        .owners(layer, expert)
        .into_iter()
        .filter(|w| usable(w))
        .collect();
    let good: Vec<&str> = owners.iter().copied().filter(|w| preferred(w)).collect();
    let from = if good.is_empty() { owners } else { good };
    (!from.is_empty()).then(|| from[(layer + expert) % from.len()])
}

/// Splits `routes` by serving worker (one replica per expert, [`pick`]) and
/// re-indexes each worker's rows. An expert without a usable owner is an error
/// naming it.
pub fn plan<'p>(
    placement: &'p Placement,
    usable: impl Fn(&str) -> bool,
    preferred: impl Fn(&str) -> bool,
    layer: usize,
    routes: &[ExpertRoute],
) -> Result<BTreeMap<&'p str, WorkerBatch>, String> {
    let mut owner_of: BTreeMap<u32, &'p str> = BTreeMap::new();
    let mut by_worker: BTreeMap<&'p str, Vec<ExpertRoute>> = BTreeMap::new();
    for r in routes {
        let owner = match owner_of.get(&r.expert) {
            Some(&w) => w,
            None => {
                let w = pick(placement, &usable, &preferred, layer, r.expert as usize).ok_or_else(
                    || format!("no live owner for layer {layer} expert {}", r.expert),
                )?;
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

/// Why one attempt at a layer failed.
pub enum Failure {
    /// A newer routing table may fix it (the reason names the layer and worker/expert).
    Retry(String),
    /// Retrying cannot help.
    Fatal(Error),
}

/// Whether a worker's error status is one a newer routing table can fix: the
/// worker is gone or unreachable, or its placement moved on. An INTERNAL status that
/// carries a source error was made by this side's transport (the connection or stream
/// broke: tonic reports a peer's stream reset as INTERNAL "h2 protocol error"), not
/// sent by the worker, and counts as the worker being gone.
pub fn classify(layer: usize, worker: &str, status: tonic::Status) -> Failure {
    use tonic::Code;
    let transport = std::error::Error::source(&status).is_some();
    match status.code() {
        Code::Internal if transport => Failure::Retry(format!(
            "layer {layer}: expert-worker {worker}: the connection broke: {}",
            status.message()
        )),
        Code::Unavailable
        | Code::FailedPrecondition
        | Code::Unknown
        | Code::Cancelled
        | Code::Aborted
        | Code::DeadlineExceeded => Failure::Retry(format!(
            "layer {layer}: expert-worker {worker}: {:?}: {}",
            status.code(),
            status.message()
        )),
        code => Failure::Fatal(Error::Worker {
            worker: worker.to_string(),
            code,
            message: status.message().to_string(),
        }),
    }
}

/// A worker's partial sums as an f32 (rows, hidden) tensor, checked.
pub fn decode_sums(
    worker: &str,
    response: &ForwardResponse,
    rows: usize,
    hidden: usize,
    xs: &Tensor,
) -> Result<Tensor, Error> {
    let bad = |message: String| Error::Worker {
        worker: worker.to_string(),
        code: tonic::Code::Ok,
        message,
    };
    let sums = response
        .sums
        .as_ref()
        .ok_or_else(|| bad("response without sums".into()))?;
    let sums = tensor::decode(sums, xs.device())
        .map_err(|e| bad(e.to_string()))?
        .to_dtype(DType::F32)
        .map_err(|e| Error::Model(e.into()))?;
    if sums.dims() != [rows, hidden] {
        return Err(bad(format!(
            "sums have shape {:?}, expected [{rows}, {hidden}]",
            sums.dims()
        )));
    }
    Ok(sums)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn a_broken_stream_is_retried_and_a_workers_internal_error_is_not() {
        let mut broken = tonic::Status::internal("h2 protocol error: stream reset");
        broken.set_source(std::sync::Arc::new(std::io::Error::other("reset by peer")));
        assert!(
            matches!(classify(1, "w", broken), Failure::Retry(m) if m.contains("connection broke"))
        );
        let answered = tonic::Status::internal("the worker's own failure");
        assert!(matches!(classify(1, "w", answered), Failure::Fatal(_)));
        assert!(matches!(
            classify(1, "w", tonic::Status::unavailable("gone")),
            Failure::Retry(_)
        ));
    }

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
        let got = plan(&p, |_| true, |_| true, 1, &routes).unwrap();
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
        let got = plan(&p, |_| true, |_| true, 2, &[route(0, 1)]).unwrap();
        assert_eq!(got.keys().copied().collect::<BTreeSet<_>>(), ["a"].into());
    }

    #[test]
    fn an_expert_without_a_live_owner_is_an_error() {
        let p = placement();
        let err = plan(&p, |w| w != "b", |_| true, 1, &[route(0, 3)]).unwrap_err();
        assert!(
            err.to_string()
                .contains("no live owner for layer 1 expert 3"),
            "{err}"
        );
    }

    /// Two replicas of every expert: "a" and "b" hold all four.
    fn replicated() -> Placement {
        let mut p = placement();
        let all: std::collections::BTreeSet<_> = [1, 2]
            .into_iter()
            .flat_map(|l| (0..4).map(move |e| (l, e)))
            .collect();
        p.assignment.insert("a".into(), all.clone());
        p.assignment.insert("b".into(), all);
        p
    }

    #[test]
    fn replicas_share_a_layers_experts_and_a_suspect_is_passed_over() {
        let p = replicated();
        let routes: Vec<ExpertRoute> = (0..4).map(|e| route(e, e)).collect();
        let got = plan(&p, |_| true, |_| true, 1, &routes).unwrap();
        let experts = |w: &str| -> Vec<u32> { got[w].routes.iter().map(|r| r.expert).collect() };
        // (layer + expert) % 2 picks: 1 → b, 2 → a, ...
        assert_eq!(experts("a"), [1, 3]);
        assert_eq!(experts("b"), [0, 2]);
        let again = plan(&p, |_| true, |_| true, 1, &routes).unwrap();
        assert_eq!(again, got, "the same expert goes to the same replica");

        let avoiding_b = plan(&p, |_| true, |w| w != "b", 1, &routes).unwrap();
        assert_eq!(avoiding_b.keys().copied().collect::<Vec<_>>(), ["a"]);
        // A suspect is still used when it is the only owner left.
        let only_b = plan(&p, |w| w == "b", |w| w != "b", 1, &routes).unwrap();
        assert_eq!(only_b.keys().copied().collect::<Vec<_>>(), ["b"]);
    }

    #[test]
    fn a_batch_maps_its_routes_back_to_the_layers_rows() {
        let p = placement();
        let routes = [route(4, 0), route(9, 1), route(4, 1)];
        let got = plan(&p, |_| true, |_| true, 1, &routes).unwrap();
        let back: Vec<ExpertRoute> = got["a"].global_routes().collect();
        assert_eq!(back, routes);
    }
}
