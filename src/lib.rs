//! koo: a gRPC control plane for caching and background work.
//!
//! # Layout
//!
//! Arrows point down the layers (top first); `scripts/check_layers.py`
//! fails on one that runs up, and `docs/design/architecture.md` draws them.
//!
//! - [`config`]: clap flags and environment variables (the seed's names)
//!   into the settings [`app`] defines; [`telemetry`]: logging set-up.
//! - [`cli`]: the client commands (`koo cache|task|cron|ps|top`): a running
//!   koo's API through the generated clients of [`pb`], tables or JSON.
//! - [`server`]: the listener, the router (gRPC metrics, one span per call,
//!   peer, auth, load shedding), the HTTP listener (`/metrics`, read at
//!   scrape time), the shutdown order: serves what `app` built.
//! - [`app`]: the composition root: `Settings`, the stores and whether they
//!   are one, the engine, the handler registry, schedules, the watch hub,
//!   health publishing and the background loops for `koo serve`, `koo
//!   worker` and `koo scheduler`.
//! - [`grpc`]: transport adapters only: each service converts requests to
//!   domain calls and results to protobuf; `grpc::status` is the one mapping
//!   of domain errors to `tonic::Status`; `grpc::span` the per-RPC span;
//!   `grpc::metrics` the per-RPC Prometheus figures.
//! - [`auth`], [`transport`], [`reload`]: callers, roles, keys and audit;
//!   TCP or TLS, connection limits; files re-read when they change.
//! - [`health`]: drives `grpc.health.v1` from the backends' real state.
//! - [`schedule`], [`watch`]: domain services over the engine: the scheduler;
//!   live streams (one reader per queue fanned out, the merged `WatchTasks`
//!   and its resume tokens, bounded buffers, shared metrics snapshots, the
//!   watcher limit) and waiting for an upkeep task's end.
//! - [`tasks`], [`cache`]: the task engine (`engine/`, `error`, `poller`,
//!   built-in `worker/`, external `remote/`, handlers, metrics); the cache
//!   (entries, TTLs, zlib, limits, figures, upkeep, warming).
//! - [`persist`]: the data directory that keeps the embedded store across
//!   restarts (`KOO_DATA_DIR`).
//! - [`store`]: one trait per store, each implemented by Redis and by the
//!   embedded store: `CacheBackend` (`Store`), `tasks::TaskBackend`
//!   (`TaskStore`: each task transition is specified once, in its method's
//!   doc; the Lua scripts are built from declared keys and arguments by
//!   `store/redis/script.rs`), `schedules::ScheduleBackend`
//!   (`ScheduleStore`); the store's clock.
//! - [`keys`]: every Redis key name koo writes.
//! - [`domain`]: the shared vocabulary: ids, queue names, the task model,
//!   outcomes, typed counts, levels, schedules. [`pb`]: generated protobuf
//!   and the reflection descriptor set.
//! - [`quote`], [`glob`]: bounded quoting of input in messages; key patterns.
//!
//! The domain never sees a `tonic::Status`; the store never sees a protobuf
//! type.

pub mod app;
pub mod auth;
pub mod cache;
pub mod cli;
pub mod config;
pub mod domain;
pub mod glob;
pub mod grpc;
pub mod health;
pub mod keys;
pub mod pb;
pub mod percent;
pub mod persist;
pub mod quote;
pub mod reload;
pub mod repeats;
pub mod schedule;
pub mod server;
pub mod store;
pub mod tasks;
pub mod telemetry;
pub mod trace;
pub mod transport;
pub mod watch;
