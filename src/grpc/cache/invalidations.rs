//! `WatchInvalidations`: the changes a near cache needs.

use std::pin::Pin;

use futures::Stream;
use tonic::{Request, Response, Status};

use super::CacheApi;
use crate::pb::cache::v1 as pb;

/// The stream `WatchInvalidations` answers.
pub type InvalidationStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchInvalidationsResponse, Status>> + Send>>;

impl CacheApi {
    pub(super) async fn watch_invalidations_rpc(
        &self,
        _request: Request<pb::WatchInvalidationsRequest>,
    ) -> Result<Response<InvalidationStream>, Status> {
        Err(Status::unimplemented("WatchInvalidations is not built yet"))
    }
}
