//! `InvalidateTags`.

use tonic::{Request, Response, Status};

use super::CacheApi;
use crate::pb::cache::v1 as pb;

impl CacheApi {
    pub(super) async fn invalidate_tags_rpc(
        &self,
        _request: Request<pb::InvalidateTagsRequest>,
    ) -> Result<Response<pb::InvalidateTagsResponse>, Status> {
        Err(Status::unimplemented("InvalidateTags is not built yet"))
    }
}
