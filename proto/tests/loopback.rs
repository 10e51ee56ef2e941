//! A real gRPC round trip over loopback TCP through the generated `Expert` server
//! and client, with the tensor codec on both ends and the raised message limits.

use std::net::SocketAddr;

use candle_core::{DType, Device, IndexOp, Tensor};
use tessera_proto::MAX_MESSAGE_BYTES;
use tessera_proto::internal::v1::expert_client::ExpertClient;
use tessera_proto::internal::v1::expert_server::{Expert, ExpertServer};
use tessera_proto::internal::v1::{
    ForwardRequest, ForwardResponse, InfoRequest, InfoResponse, LoadRequest, LoadResponse,
    UnloadRequest, UnloadResponse,
};
use tessera_proto::tensor::{decode, encode};
use tonic::transport::Channel;
use tonic::transport::server::TcpIncoming;
use tonic::{Code, Request, Response, Status};

const FINGERPRINT: &str = "test-fingerprint";
const HIDDEN: usize = 2560;

/// TEST DOUBLE, not a model: "expert e" multiplies its input by `e + 1`, so the
/// reply for row r is `Σ weight · (expert + 1) · rows[r]` over r's routes.
struct ScalingExperts;

#[tonic::async_trait]
impl Expert for ScalingExperts {
    async fn forward(
        &self,
        request: Request<ForwardRequest>,
    ) -> Result<Response<ForwardResponse>, Status> {
        let req = request.into_inner();
        if req.model_fingerprint != FINGERPRINT {
            return Err(Status::failed_precondition("model fingerprint differs"));
        }
        let wire = req
            .rows
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("rows missing"))?;
        let rows =
            decode(wire, &Device::Cpu).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let n = req.route_rows.len();
        if req.route_experts.len() != n || req.route_weights.len() != n {
            return Err(Status::invalid_argument("route lists differ in length"));
        }
        let mut scale = vec![0f32; rows.dim(0).map_err(internal)?];
        for i in 0..n {
            let row = req.route_rows[i] as usize;
            let slot = scale
                .get_mut(row)
                .ok_or_else(|| Status::invalid_argument("route row out of range"))?;
            *slot += req.route_weights[i] * (req.route_experts[i] + 1) as f32;
        }
        let scale = Tensor::from_vec(scale, (rows.dim(0).map_err(internal)?, 1), &Device::Cpu)
            .map_err(internal)?;
        let sums = rows.broadcast_mul(&scale).map_err(internal)?;
        let sums = encode(&sums).map_err(internal)?;
        Ok(Response::new(ForwardResponse { sums: Some(sums) }))
    }

    async fn load(&self, _: Request<LoadRequest>) -> Result<Response<LoadResponse>, Status> {
        Err(Status::unimplemented("test double"))
    }

    async fn unload(&self, _: Request<UnloadRequest>) -> Result<Response<UnloadResponse>, Status> {
        Err(Status::unimplemented("test double"))
    }

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Ok(Response::new(InfoResponse {
            model_fingerprint: FINGERPRINT.into(),
            held: Vec::new(),
            ready: true,
            placement_version: 0,
            held_bytes: 0,
        }))
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

/// Serves the test double on a fresh loopback port; the listener is bound before
/// this returns, so clients can connect at once.
async fn serve(raise_limits: bool) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut service = ExpertServer::new(ScalingExperts);
    if raise_limits {
        service = service
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
    }
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    addr
}

async fn client(addr: SocketAddr) -> ExpertClient<Channel> {
    ExpertClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// `rows` rows of width HIDDEN with distinct values, and three routes per row.
fn batch(rows: usize) -> (Tensor, ForwardRequest) {
    let x = Tensor::arange(0u32, (rows * HIDDEN) as u32, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .affine(1e-3, -1.0)
        .unwrap()
        .reshape((rows, HIDDEN))
        .unwrap();
    let mut req = ForwardRequest {
        model_fingerprint: FINGERPRINT.into(),
        layer: 3,
        rows: Some(encode(&x).unwrap()),
        ..Default::default()
    };
    for r in 0..rows as u32 {
        for (k, w) in [0.5f32, 0.25, 0.125].into_iter().enumerate() {
            req.route_rows.push(r);
            req.route_experts.push((r + k as u32) % 64);
            req.route_weights.push(w);
        }
    }
    (x, req)
}

/// What the test double must return for `req`, computed here without the wire.
fn expected(x: &Tensor, req: &ForwardRequest) -> Vec<Vec<f32>> {
    let mut scale = vec![0f32; x.dim(0).unwrap()];
    for i in 0..req.route_rows.len() {
        scale[req.route_rows[i] as usize] +=
            req.route_weights[i] * (req.route_experts[i] + 1) as f32;
    }
    (0..scale.len())
        .map(|r| {
            let row = x.i(r).unwrap().to_vec1::<f32>().unwrap();
            row.iter().map(|v| v * scale[r]).collect()
        })
        .collect()
}

async fn round_trip(client: &mut ExpertClient<Channel>, rows: usize, min_bytes: usize) {
    let (x, req) = batch(rows);
    let payload = req.rows.as_ref().unwrap().data.len();
    assert!(payload >= min_bytes, "payload {payload} bytes");
    let want = expected(&x, &req);
    let reply = client.forward(req).await.unwrap().into_inner();
    let sums = decode(reply.sums.as_ref().unwrap(), &Device::Cpu).unwrap();
    assert_eq!(sums.dims(), &[rows, HIDDEN]);
    assert_eq!(sums.to_vec2::<f32>().unwrap(), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expert_forward_round_trips_decode_and_prefill_sizes() {
    let addr = serve(true).await;
    let mut client = client(addr).await;

    let info = client.info(InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.model_fingerprint, FINGERPRINT);
    assert!(info.ready);

    // Decode size: 4 rows × 2560 f32 = 40 KiB.
    round_trip(&mut client, 4, 40 * 1024).await;
    // Prefill size: 512 rows × 2560 f32 = 5 MiB each way, over tonic's 4 MiB default.
    round_trip(&mut client, 512, 4 * 1024 * 1024 + 1).await;

    let (_, mut wrong) = batch(1);
    wrong.model_fingerprint = "other".into();
    let err = client.forward(wrong).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_limits_reject_prefill_size() {
    // Control: the same 5 MiB request to a server left at tonic's defaults fails,
    // so the test above passes because of MAX_MESSAGE_BYTES.
    let addr = serve(false).await;
    let mut client = client(addr).await;
    let (_, req) = batch(512);
    let err = client.forward(req).await.unwrap_err();
    // tonic 0.14 reports an over-limit message as OUT_OF_RANGE.
    assert_eq!(err.code(), Code::OutOfRange, "{err}");
    assert!(err.message().contains("too large"), "{err}");
    round_trip(&mut client, 4, 40 * 1024).await;
}
