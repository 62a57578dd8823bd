//! koo's end-to-end tests, one test binary: every module starts real
//! processes (redis-server, koo) or in-process servers on free loopback
//! ports and calls them over real channels. One binary rather than one per
//! file: the harness (`common`) and the generated clients are compiled and
//! linked once, which saved about two minutes of every CI run. Run one
//! area with `cargo test --test it <module>::` (e.g. `streams::`).

#[macro_use]
mod common;

mod auth;
mod binary;
mod breaker;
mod cache;
mod cache_compute;
mod cache_gather;
mod cache_tags;
mod cache_watch;
mod chaos;
mod cli;
mod cluster;
mod cluster_cache;
mod cluster_tasks;
mod config_env;
mod dashboard;
mod dead_letters;
mod debounce;
mod expiry;
mod flow;
mod flow_store;
mod grpc_web;
mod hostile_bytes;
mod lease_secrets;
mod limits_api;
mod metrics;
mod parity;
mod persist;
mod queues;
mod redis_security;
mod rest;
mod schedules;
mod sentinel;
mod store_faults;
mod streams;
mod task_batch;
mod task_control;
mod task_engine;
mod task_handoff;
mod task_store;
mod task_times;
mod task_wake;
mod tasks_grpc;
mod tls;
mod traces;
mod validation;
mod worker_batch;
mod worker_grpc;
mod worker_python;
mod worker_reattach;
mod worker_retry;
mod worker_stream;
