//! The floor under koo's cache hot path: a gRPC server that answers
//! `CacheService.Get` and `Set` from a map in memory, with nothing else —
//! no Redis, no tower layers, no metrics, tonic's own prost codec. What it
//! costs per call is what tonic, hyper, h2 and tokio cost on this machine
//! before koo does any work (issue 19, `docs/perf/cache-get.md`).
//!
//! It takes koo's command line (`serve --listen ADDR`, the rest ignored) and
//! announces itself as koo does, so that the cache benchmark can measure
//! it in koo's place:
//!
//! ```text
//! cargo build --release --example grpc_floor
//! KOO_BENCH_BIN=target/release/examples/grpc_floor BENCH_QUICK=1 cargo bench --bench cache
//! ```

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use koo::pb::cache::v1::{
    CacheValue, GetRequest, GetResponse, SetManyRequest, SetManyResponse, SetRequest, SetResponse,
};
use tonic::body::Body;
use tonic::codegen::BoxFuture;
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;

type Map = Arc<Mutex<HashMap<(i32, String), CacheValue>>>;

/// Routes the three paths the benchmark calls; everything else is UNIMPLEMENTED.
#[derive(Clone, Default)]
struct Floor {
    map: Map,
}

impl NamedService for Floor {
    const NAME: &'static str = "koo.cache.v1.CacheService";
}

struct GetSvc(Map);

impl UnaryService<GetRequest> for GetSvc {
    type Response = GetResponse;
    type Future = BoxFuture<Response<GetResponse>, Status>;
    fn call(&mut self, request: Request<GetRequest>) -> Self::Future {
        let map = self.0.clone();
        Box::pin(async move {
            let r = request.into_inner();
            let value = map
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&(r.level, r.key))
                .cloned();
            Ok(Response::new(GetResponse {
                found: value.is_some(),
                value,
                ..Default::default()
            }))
        })
    }
}

struct SetSvc(Map);

impl UnaryService<SetRequest> for SetSvc {
    type Response = SetResponse;
    type Future = BoxFuture<Response<SetResponse>, Status>;
    fn call(&mut self, request: Request<SetRequest>) -> Self::Future {
        let map = self.0.clone();
        Box::pin(async move {
            let r = request.into_inner();
            if let Some(value) = r.value {
                map.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert((r.level, r.key), value);
            }
            Ok(Response::new(SetResponse::default()))
        })
    }
}

struct SetManySvc(Map);

impl UnaryService<SetManyRequest> for SetManySvc {
    type Response = SetManyResponse;
    type Future = BoxFuture<Response<SetManyResponse>, Status>;
    fn call(&mut self, request: Request<SetManyRequest>) -> Self::Future {
        let map = self.0.clone();
        Box::pin(async move {
            let entries = request.into_inner().entries;
            let results = vec![SetResponse::default(); entries.len()];
            let mut map = map.lock().unwrap_or_else(PoisonError::into_inner);
            for e in entries {
                if let Some(value) = e.value {
                    map.insert((e.level, e.key), value);
                }
            }
            Ok(Response::new(SetManyResponse { results }))
        })
    }
}

impl tower::Service<http::Request<Body>> for Floor {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let map = self.map.clone();
        match req.uri().path() {
            "/koo.cache.v1.CacheService/Get" => Box::pin(async move {
                let mut grpc = Grpc::new(ProstCodec::default());
                Ok(grpc.unary(GetSvc(map), req).await)
            }),
            "/koo.cache.v1.CacheService/Set" => Box::pin(async move {
                let mut grpc = Grpc::new(ProstCodec::default());
                Ok(grpc.unary(SetSvc(map), req).await)
            }),
            "/koo.cache.v1.CacheService/SetMany" => Box::pin(async move {
                let mut grpc = Grpc::new(ProstCodec::default());
                Ok(grpc.unary(SetManySvc(map), req).await)
            }),
            _ => Box::pin(async move {
                Ok(
                    Status::unimplemented("the floor server answers Get, Set and SetMany only")
                        .into_http(),
                )
            }),
        }
    }
}

fn listen_addr() -> SocketAddr {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--listen")
        .and_then(|i| args.get(i + 1))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let listener = tokio::net::TcpListener::bind(listen_addr()).await?;
    let addr = listener.local_addr()?;
    // The benchmark reads the address from this line, as from koo's log.
    eprintln!(" INFO koo serving gRPC addr={addr}");
    tonic::transport::Server::builder()
        .add_service(Floor::default())
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await?;
    Ok(())
}
