//! `GetOrLock`, `Fill` and `GetOrCompute`: compute a missing value once.

use tonic::{Request, Response, Status};

use super::CacheApi;
use crate::pb::cache::v1 as pb;

impl CacheApi {
    pub(super) async fn get_or_lock_rpc(
        &self,
        _request: Request<pb::GetOrLockRequest>,
    ) -> Result<Response<pb::GetOrLockResponse>, Status> {
        Err(Status::unimplemented("GetOrLock is not built yet"))
    }

    pub(super) async fn fill_rpc(
        &self,
        _request: Request<pb::FillRequest>,
    ) -> Result<Response<pb::FillResponse>, Status> {
        Err(Status::unimplemented("Fill is not built yet"))
    }

    pub(super) async fn get_or_compute_rpc(
        &self,
        _request: Request<pb::GetOrComputeRequest>,
    ) -> Result<Response<pb::GetOrComputeResponse>, Status> {
        Err(Status::unimplemented("GetOrCompute is not built yet"))
    }
}
