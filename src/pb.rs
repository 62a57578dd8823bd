//! Generated protobuf and gRPC code, fenced off from hand-written code.
//!
//! `build.rs` compiles `proto/` with protox; this module includes the output and
//! the encoded descriptor set that server reflection serves.

/// `koo.auth.v1`: the AuthService API (who the caller is).
pub mod auth {
    #[allow(clippy::all, clippy::pedantic, missing_docs)]
    #[rustfmt::skip]
    pub mod v1 {
        tonic::include_proto!("koo.auth.v1");
    }
}

/// `koo.cache.v1`: the CacheService API.
pub mod cache {
    #[allow(clippy::all, clippy::pedantic, missing_docs)]
    #[rustfmt::skip]
    pub mod v1 {
        tonic::include_proto!("koo.cache.v1");
    }
}

/// `koo.tasks.v1`: the TaskService API.
pub mod tasks {
    #[allow(clippy::all, clippy::pedantic, missing_docs)]
    #[rustfmt::skip]
    pub mod v1 {
        tonic::include_proto!("koo.tasks.v1");
    }
}

/// `koo.schedule.v1`: the ScheduleService API, for periodic jobs.
pub mod schedule {
    #[allow(clippy::all, clippy::pedantic, missing_docs)]
    #[rustfmt::skip]
    pub mod v1 {
        tonic::include_proto!("koo.schedule.v1");
    }
}

/// `koo.worker.v1`: the WorkerService API, for external task workers.
pub mod worker {
    #[allow(clippy::all, clippy::pedantic, missing_docs)]
    #[rustfmt::skip]
    pub mod v1 {
        tonic::include_proto!("koo.worker.v1");
    }
}

/// Every koo proto and its imports (well-known types included), encoded as a
/// `FileDescriptorSet`, for server reflection and for clients that want it.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/koo_descriptor.bin"));
