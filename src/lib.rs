//! koo: a gRPC control plane for caching and background work.
//!
//! # Layout
//!
//! Data flows one way: `grpc` → domain (`cache`) → `store`.
//!
//! - [`server`]: builds the store, cache and tonic router; runs background
//!   loops; shuts down in order.
//! - [`config`]: clap flags and environment variables (the seed's names).
//! - [`grpc`]: transport adapters only: request conversion, the one mapping of
//!   domain errors to `tonic::Status`, the codec.
//! - [`cache`]: the cache domain: levels, value encoding and zlib, limits,
//!   metrics, warming, cleanup and maintenance.
//! - [`store`]: backends: Redis (pool, breaker, recovery prober, retries, Lua)
//!   and the embedded in-process store.
//! - [`keys`]: every Redis key name koo writes.
//! - [`persist`]: the data directory that keeps the embedded store across
//!   restarts (`KOO_DATA_DIR`).
//! - [`health`]: drives `grpc.health.v1` from the backend's real state.
//! - [`pb`]: generated protobuf code and the reflection descriptor set.
//! - [`quote`]: bounded quoting of user input in messages.
//! - [`auth`]: callers, roles, API keys and the method-to-role table.
//! - [`reload`]: files re-read when they change (certificates, keys).
//! - [`transport`]: the listener: TCP or TLS, connection limits.
//! - [`watch`]: live streams: one reader per queue per process fanned out
//!   to every watcher, bounded buffers, shared metrics snapshots, the
//!   watcher limit.
//!
//! The domain never sees a `tonic::Status`; the store never sees a protobuf
//! type.

pub mod app;
pub mod auth;
pub mod cache;
pub mod config;
pub mod domain;
pub mod glob;
pub mod grpc;
pub mod health;
pub mod keys;
pub mod pb;
pub mod persist;
pub mod quote;
pub mod reload;
pub mod schedule;
pub mod server;
pub mod store;
pub mod tasks;
pub mod telemetry;
pub mod transport;
pub mod watch;
