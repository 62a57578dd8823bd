//! `InvalidateTags`: converts the request, calls
//! [`crate::cache::Cache::invalidate_tags`].

use tonic::{Request, Response, Status};

use super::CacheApi;
use super::entries::level;
use crate::pb::cache::v1 as pb;

impl CacheApi {
    pub(super) async fn invalidate_tags_rpc(
        &self,
        request: Request<pb::InvalidateTagsRequest>,
    ) -> Result<Response<pb::InvalidateTagsResponse>, Status> {
        let deadline = self.deadline(&request);
        let r = request.into_inner();
        // Unspecified means every level here (elsewhere it means app).
        let level = match r.level {
            0 => None,
            raw => Some(level("level", raw)?),
        };
        let known = self.cache.invalidate_tags(level, &r.tags, deadline).await?;
        Ok(Response::new(pb::InvalidateTagsResponse {
            known_count: known as i64,
        }))
    }
}
