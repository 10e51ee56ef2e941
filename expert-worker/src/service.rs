//! The `Expert` gRPC service over the routed experts held in this process.
//!
//! `Forward` validates the request on the async runtime (cheap checks only), then
//! decodes, computes and encodes on a blocking thread: no tensor work runs on
//! the runtime's workers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use candle_core::{DType, Device};
use tessera_model::config::ModelConfig;
use tessera_model::experts::{ExpertBackend, ExpertRoute, ExpertSelection, LocalExperts};
use tessera_model::weights::{Checkpoint, LoadTarget};
use tessera_proto::internal::v1::expert_server::Expert;
use tessera_proto::internal::v1::{
    ForwardRequest, ForwardResponse, InfoRequest, InfoResponse, LayerExperts, LoadRequest,
    LoadResponse, UnloadRequest, UnloadResponse,
};
use tessera_proto::tensor;
use tonic::{Request, Response, Status};

use crate::Config;
use crate::error::{Error, Result};

/// The experts this worker holds and what it needs to check requests against.
struct Shard {
    experts: LocalExperts,
    held: BTreeSet<(usize, usize)>,
    hidden_size: usize,
    fingerprint: String,
}

/// Serves `tessera.internal.v1.Expert` for one shard of routed experts.
#[derive(Clone)]
pub struct ExpertService {
    shard: Arc<Shard>,
}

impl std::fmt::Debug for ExpertService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExpertService")
            .field("experts", &self.shard.held.len())
            .field("fingerprint", &self.shard.fingerprint)
            .finish_non_exhaustive()
    }
}

impl ExpertService {
    /// Loads exactly `cfg.experts` from the snapshot, in f32 on the CPU. Blocking.
    pub fn load(cfg: &Config) -> Result<Self> {
        let config = ModelConfig::from_dir(&cfg.model).map_err(Error::Load)?;
        let checkpoint = Checkpoint::open(&cfg.model).map_err(Error::Load)?;
        let device = Device::Cpu;
        let target = LoadTarget {
            checkpoint: &checkpoint,
            dtype: DType::F32,
            device: &device,
        };
        let selection = ExpertSelection::Only(cfg.experts.clone());
        let experts =
            LocalExperts::load(&config.language, target, &selection).map_err(Error::Load)?;
        Ok(Self {
            shard: Arc::new(Shard {
                experts,
                held: cfg.experts.clone(),
                hidden_size: config.language.hidden_size,
                fingerprint: cfg.fingerprint.clone(),
            }),
        })
    }

    /// Number of `(layer, expert)` pairs held.
    pub fn len(&self) -> usize {
        self.shard.experts.len()
    }

    /// Whether no expert is held.
    pub fn is_empty(&self) -> bool {
        self.shard.experts.is_empty()
    }

    fn forward_blocking(
        &self,
        req: &ForwardRequest,
        routes: &[ExpertRoute],
    ) -> Result<ForwardResponse> {
        let rows = req
            .rows
            .as_ref()
            .ok_or_else(|| Error::Malformed("`rows` is missing".into()))?;
        let xs = tensor::decode(rows, &Device::Cpu)?;
        let (n, hidden) = xs.dims2().map_err(|_| {
            Error::Malformed(format!("`rows` has shape {:?}, expected 2-D", xs.dims()))
        })?;
        if hidden != self.shard.hidden_size {
            return Err(Error::Malformed(format!(
                "`rows` has {hidden} columns, the model's hidden size is {}",
                self.shard.hidden_size
            )));
        }
        if let Some(r) = routes.iter().find(|r| r.row as usize >= n) {
            return Err(Error::Malformed(format!(
                "route row {} is outside the batch of {n} rows",
                r.row
            )));
        }
        // Experts run in f32 here; answer in the request's dtype.
        let sums = self
            .shard
            .experts
            .forward(
                req.layer as usize,
                &xs.to_dtype(DType::F32)
                    .map_err(|e| Error::Compute(e.into()))?,
                routes,
            )
            .and_then(|s| Ok(s.to_dtype(xs.dtype())?))
            .map_err(Error::Compute)?;
        Ok(ForwardResponse {
            sums: Some(tensor::encode(&sums)?),
        })
    }

    fn held_by_layer(&self) -> Vec<LayerExperts> {
        let mut layers: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
        for &(layer, expert) in &self.shard.held {
            layers.entry(layer).or_default().push(expert as u32);
        }
        layers
            .into_iter()
            .map(|(layer, experts)| LayerExperts {
                layer: layer as u32,
                experts,
            })
            .collect()
    }
}

/// The routes of a request, checked against what this worker holds.
fn routes(
    req: &ForwardRequest,
    fingerprint: &str,
    held: &BTreeSet<(usize, usize)>,
) -> Result<Vec<ExpertRoute>> {
    if req.model_fingerprint != fingerprint {
        return Err(Error::FingerprintMismatch {
            request: req.model_fingerprint.clone(),
            ours: fingerprint.to_string(),
        });
    }
    let (n_rows, n_experts, n_weights) = (
        req.route_rows.len(),
        req.route_experts.len(),
        req.route_weights.len(),
    );
    if n_rows != n_experts || n_rows != n_weights {
        return Err(Error::Malformed(format!(
            "route lists differ in length: {n_rows} rows, {n_experts} experts, {n_weights} weights"
        )));
    }
    let layer = req.layer as usize;
    let routes: Vec<ExpertRoute> = req
        .route_rows
        .iter()
        .zip(&req.route_experts)
        .zip(&req.route_weights)
        .map(|((&row, &expert), &weight)| ExpertRoute {
            row,
            expert,
            weight,
        })
        .collect();
    if let Some(r) = routes
        .iter()
        .find(|r| !held.contains(&(layer, r.expert as usize)))
    {
        return Err(Error::NotHeld {
            layer,
            expert: r.expert as usize,
        });
    }
    Ok(routes)
}

#[tonic::async_trait]
impl Expert for ExpertService {
    async fn forward(
        &self,
        request: Request<ForwardRequest>,
    ) -> Result<Response<ForwardResponse>, Status> {
        let req = request.into_inner();
        let routes = routes(&req, &self.shard.fingerprint, &self.shard.held)?;
        let this = self.clone();
        let response = tokio::task::spawn_blocking(move || this.forward_blocking(&req, &routes))
            .await
            .map_err(Error::Join)??;
        Ok(Response::new(response))
    }

    async fn load(&self, _: Request<LoadRequest>) -> Result<Response<LoadResponse>, Status> {
        Err(Error::Unsupported("Load").into())
    }

    async fn unload(&self, _: Request<UnloadRequest>) -> Result<Response<UnloadResponse>, Status> {
        Err(Error::Unsupported("Unload").into())
    }

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Ok(Response::new(InfoResponse {
            model_fingerprint: self.shard.fingerprint.clone(),
            held: self.held_by_layer(),
            ready: true,
            placement_version: 0,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(rows: Vec<u32>, experts: Vec<u32>, weights: Vec<f32>) -> ForwardRequest {
        ForwardRequest {
            model_fingerprint: "fp".into(),
            layer: 1,
            rows: None,
            route_rows: rows,
            route_experts: experts,
            route_weights: weights,
        }
    }

    fn held() -> BTreeSet<(usize, usize)> {
        [(1, 0), (1, 1)].into_iter().collect()
    }

    #[test]
    fn routes_are_zipped_from_the_parallel_lists() {
        let got = routes(
            &request(vec![0, 2], vec![1, 0], vec![0.5, 0.25]),
            "fp",
            &held(),
        )
        .unwrap();
        assert_eq!(
            got,
            vec![
                ExpertRoute {
                    row: 0,
                    expert: 1,
                    weight: 0.5
                },
                ExpertRoute {
                    row: 2,
                    expert: 0,
                    weight: 0.25
                },
            ]
        );
    }

    #[test]
    fn unequal_route_lists_are_malformed() {
        let err = routes(&request(vec![0, 1], vec![1], vec![0.5, 0.5]), "fp", &held()).unwrap_err();
        assert!(matches!(err, Error::Malformed(_)), "{err}");
    }

    #[test]
    fn an_expert_not_held_is_refused() {
        let err = routes(&request(vec![0], vec![5], vec![1.0]), "fp", &held()).unwrap_err();
        assert!(
            matches!(
                err,
                Error::NotHeld {
                    layer: 1,
                    expert: 5
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn another_models_fingerprint_is_refused() {
        let err = routes(&request(vec![0], vec![0], vec![1.0]), "other", &held()).unwrap_err();
        assert!(matches!(err, Error::FingerprintMismatch { .. }), "{err}");
    }
}
