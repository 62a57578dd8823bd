//! What `/metrics` answers: the gRPC layer's figures, the cache's, and the
//! task queues' read from the shared store, as OpenMetrics text.
//!
//! Everything is read at scrape time from figures koo keeps anyway (the
//! cache's relaxed atomics, the gRPC layer's): recording stays where it
//! was, and nothing is added to the hot paths. Counters and histograms are
//! this instance's own (Prometheus sums instances); the queues' depths and
//! counts and the workers are facts of the shared store, the same on every
//! instance, and their help text says so.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::cache::Cache;
use crate::cache::histogram::HistogramSnapshot;
use crate::cache::metrics::{Counters, Op};
use crate::domain::level::Level;
use crate::domain::stats::Count;
use crate::grpc::metrics::{GrpcMetrics, TASK_SECONDS_BOUNDS, encode_seconds, encode_seconds_in};
use crate::persist::Embedded;
use crate::schedule::Schedules;
use crate::store::Deadline;
use crate::tasks::counters::{OUTCOMES, QueueFigures, TaskCounters};
use crate::tasks::engine::TaskEngine;
use crate::tasks::metrics::TaskMetrics;

/// How long a scrape waits for the shared store's figures.
const STORE_DEADLINE: Duration = Duration::from_secs(2);

/// Said of every figure read from the shared store.
const SHARED: &str = "The same on every instance sharing the store: query with max.";

/// The `/metrics` answer.
pub struct Exporter {
    registry: Registry,
    engine: TaskEngine,
    /// The task figures of the scrape under way. A std mutex: held only to
    /// swap or read a value, never across an await.
    tasks: Arc<Mutex<Option<TaskMetrics>>>,
}

impl Exporter {
    /// The exporter of `koo serve`: `grpc`, `cache`, the queues of
    /// `engine` and the scheduler's `schedules`.
    pub fn new(grpc: GrpcMetrics, cache: Cache, engine: TaskEngine, schedules: Schedules) -> Self {
        let mut exporter = Self::of_tasks(engine, Some(schedules));
        exporter.registry.register_collector(Box::new(grpc));
        exporter
            .registry
            .register_collector(Box::new(CacheCollector { cache }));
        exporter
    }

    /// Adds the data directory's figures (`KOO_DATA_DIR`; nothing without
    /// one).
    pub fn with_data_dir(mut self, embedded: Embedded) -> Self {
        self.registry
            .register_collector(Box::new(DataDirCollector { embedded }));
        self
    }

    /// The exporter of `koo worker` (the tasks its slots ran, and the
    /// queues) and of `koo scheduler` (with its `schedules`' fires): no
    /// gRPC and no cache figures, which such a process does not have.
    pub fn of_tasks(engine: TaskEngine, schedules: Option<Schedules>) -> Self {
        let tasks = Arc::new(Mutex::new(None));
        let mut registry = Registry::default();
        registry.register_collector(Box::new(TaskCollector {
            latest: tasks.clone(),
        }));
        if let Some(schedules) = schedules {
            registry.register_collector(Box::new(ScheduleCollector { schedules }));
        }
        registry.register_collector(Box::new(OwnTasks {
            counters: engine.counters().clone(),
        }));
        Self {
            registry,
            engine,
            tasks,
        }
    }

    /// The OpenMetrics text of a scrape. When the store does not answer,
    /// its figures are left out (and a warning logged) rather than the
    /// scrape failing: this instance's own figures are still good.
    pub async fn scrape(&self) -> String {
        let figures = match self.engine.metrics(Deadline::after(STORE_DEADLINE)).await {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!(error = %e, "/metrics: the task store's figures are missing");
                None
            }
        };
        *self.tasks.lock().unwrap_or_else(|p| p.into_inner()) = figures;
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "/metrics: encoding failed");
        }
        out
    }
}

fn counter(
    encoder: &mut prometheus_client::encoding::MetricEncoder<'_>,
    n: u64,
) -> Result<(), std::fmt::Error> {
    encoder.encode_counter::<NoLabelSet, u64, u64>(&n, None)
}

/// A metric's name, help and how to read it.
type Described<F> = (&'static str, &'static str, F);
type ReadCount = fn(&Counters) -> u64;
type ReadHistogram = fn(&QueueFigures) -> &HistogramSnapshot;

/// The cache's figures of this instance.
struct CacheCollector {
    cache: Cache,
}

impl std::fmt::Debug for CacheCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CacheCollector")
    }
}

impl Collector for CacheCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.cache.own_metrics();
        let per_level: [Described<ReadCount>; 6] = [
            (
                "koo_cache_hits",
                "Reads that found a value, by level.",
                |c| c.hits,
            ),
            (
                "koo_cache_misses",
                "Reads that found nothing, by level.",
                |c| c.misses,
            ),
            ("koo_cache_errors", "Backend failures, by level.", |c| {
                c.errors
            }),
            ("koo_cache_sets", "Values written, by level.", |c| c.sets),
            ("koo_cache_deletes", "Keys removed, by level.", |c| {
                c.deletes
            }),
            ("koo_cache_operations", "Cache RPCs, by level.", |c| {
                c.operations
            }),
        ];
        for (name, help, value) in per_level {
            let help = format!("{help} Per instance.");
            let mut family = encoder.encode_descriptor(name, &help, None, MetricType::Counter)?;
            for level in Level::ALL {
                let n = value(&s.levels[level.index()]);
                counter(&mut family.encode_family(&[("level", level.as_str())])?, n)?;
            }
        }
        {
            let help = "Seconds a cache operation took, by operation (per instance).";
            let mut family = encoder.encode_descriptor(
                "koo_cache_operation_seconds",
                help,
                None,
                MetricType::Histogram,
            )?;
            for op in Op::ALL {
                let labels = [("op", op.as_str())];
                encode_seconds(
                    &mut family.encode_family(&labels)?,
                    &s.latencies[op as usize],
                )?;
            }
        }
        let bytes = [
            (
                "koo_cache_written_bytes",
                "Bytes of values written, before compression (per instance).",
                s.bytes_raw,
            ),
            (
                "koo_cache_stored_bytes",
                "Bytes of values written, as stored after compression (per instance).",
                s.bytes_stored,
            ),
            (
                "koo_cache_compression_saved_bytes",
                "Bytes compression saved on writes: written minus stored (per instance).",
                s.bytes_raw.saturating_sub(s.bytes_stored),
            ),
        ];
        for (name, help, n) in bytes {
            counter(
                &mut encoder.encode_descriptor(name, help, None, MetricType::Counter)?,
                n,
            )?;
        }
        Ok(())
    }
}

/// The queues' and workers' figures of the scrape under way.
#[derive(Debug)]
struct TaskCollector {
    latest: Arc<Mutex<Option<TaskMetrics>>>,
}

impl Collector for TaskCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(m) = self
            .latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return Ok(());
        };
        let gauge = |v: u64| ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
        {
            let help = format!(
                "Tasks waiting, by queue and state (ready, scheduled, pending on dependencies, dead-lettered). {SHARED}"
            );
            let mut family =
                encoder.encode_descriptor("koo_tasks_queued", &help, None, MetricType::Gauge)?;
            for (queue, s) in &m.queues {
                for (state, n) in [
                    ("ready", s.ready),
                    ("scheduled", s.scheduled),
                    ("pending", s.pending),
                    ("dead", s.dead),
                ] {
                    let labels = [("queue", queue.as_str()), ("state", state)];
                    gauge(n).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        {
            let help = format!("Tasks running, by queue. {SHARED}");
            let mut family =
                encoder.encode_descriptor("koo_tasks_running", &help, None, MetricType::Gauge)?;
            for (queue, s) in &m.queues {
                gauge(s.running).encode(family.encode_family(&[("queue", queue.as_str())])?)?;
            }
        }
        {
            let help = format!(
                "Seconds the oldest ready task of the queue has waited (0: none waits). {SHARED}"
            );
            let mut family = encoder.encode_descriptor(
                "koo_tasks_oldest_wait_seconds",
                &help,
                None,
                MetricType::Gauge,
            )?;
            for (queue, s) in &m.queues {
                let wait = s.oldest_wait.unwrap_or_default().as_secs_f64();
                family
                    .encode_family(&[("queue", queue.as_str())])?
                    .encode_gauge(&wait)?;
            }
        }
        encode_paused(&mut encoder, &m)?;
        {
            let help = format!(
                "Tasks by queue and outcome (submitted, succeeded, failed, timed_out, cancelled, retried, lost, requeued), as the store counts them for every instance. {SHARED}"
            );
            let mut family = encoder.encode_descriptor(
                "koo_tasks_outcomes",
                &help,
                None,
                MetricType::Counter,
            )?;
            for (queue, s) in &m.queues {
                for count in Count::ALL {
                    let labels = [("queue", queue.as_str()), ("outcome", count.as_str())];
                    counter(&mut family.encode_family(&labels)?, s.counts.get(count))?;
                }
            }
        }
        encode_workers(&mut encoder, &m)
    }
}

/// `koo_queue_paused`: 1 per paused queue, 0 per running one.
fn encode_paused(encoder: &mut DescriptorEncoder, m: &TaskMetrics) -> Result<(), std::fmt::Error> {
    let help = format!("1 while the queue is paused (PauseQueue: it hands out nothing). {SHARED}");
    let mut family =
        encoder.encode_descriptor("koo_queue_paused", &help, None, MetricType::Gauge)?;
    for (queue, s) in &m.queues {
        ConstGauge::new(i64::from(s.paused.is_some()))
            .encode(family.encode_family(&[("queue", queue.as_str())])?)?;
    }
    Ok(())
}

/// This instance's task counters and histograms, per queue.
#[derive(Debug)]
struct OwnTasks {
    counters: TaskCounters,
}

impl Collector for OwnTasks {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let figures = self.counters.read();
        {
            let help = "Tasks this instance submitted, and attempts it finished, by queue and outcome (submitted, succeeded, failed, timed_out, retried; per instance; queues outside the configuration count as `other`).";
            let mut family =
                encoder.encode_descriptor("koo_tasks", help, None, MetricType::Counter)?;
            for f in &figures {
                for (outcome, n) in OUTCOMES.iter().zip(f.counts) {
                    let labels = [("queue", f.queue.as_str()), ("outcome", *outcome)];
                    counter(&mut family.encode_family(&labels)?, n)?;
                }
            }
        }
        {
            let help = "Tasks this instance's submits gave straight to one of its idle built-in worker slots, leased in the submit's own round trip, by queue (per instance).";
            let mut family =
                encoder.encode_descriptor("koo_task_handoffs", help, None, MetricType::Counter)?;
            for f in &figures {
                let labels = [("queue", f.queue.as_str())];
                counter(&mut family.encode_family(&labels)?, f.handed)?;
            }
        }
        {
            let help = "Wakes this instance took from Redis for its idle workers, by queue: a task made ready through another koo process (a submit, a retry, a hand-back, a dependency's release, a sweep that made tasks due) while this one's workers waited idle (per instance).";
            let mut family =
                encoder.encode_descriptor("koo_task_wakes", help, None, MetricType::Counter)?;
            for f in &figures {
                let labels = [("queue", f.queue.as_str())];
                counter(&mut family.encode_family(&labels)?, f.woken)?;
            }
        }
        let histograms: [Described<ReadHistogram>; 2] = [
            (
                "koo_task_run_seconds",
                "Seconds an attempt ran, from its lease to its end, by queue (per instance).",
                |f| &f.run,
            ),
            (
                "koo_task_wait_seconds",
                "Seconds a task waited from its submit to its first start, by queue (per instance).",
                |f| &f.wait,
            ),
        ];
        for (name, help, of) in histograms {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for f in &figures {
                encode_seconds_in(
                    &mut family.encode_family(&[("queue", f.queue.as_str())])?,
                    of(f),
                    &TASK_SECONDS_BOUNDS,
                )?;
            }
        }
        Ok(())
    }
}

/// The scheduler's ticks of this instance.
struct ScheduleCollector {
    schedules: Schedules,
}

impl std::fmt::Debug for ScheduleCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScheduleCollector")
    }
}

impl Collector for ScheduleCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let f = self.schedules.figures();
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        let all = [
            (
                "koo_schedule_fires",
                "Schedule ticks whose task this instance submitted (per instance).",
                load(&f.fired),
            ),
            (
                "koo_schedule_missed_ticks",
                "Schedule ticks this instance found missed after downtime, under every policy (per instance; the schedule's policy decides whether the latest still runs; schedulers that start together each count the same ticks).",
                load(&f.missed),
            ),
            (
                "koo_schedule_fire_errors",
                "Schedule ticks whose task could not be submitted (per instance).",
                load(&f.failed),
            ),
        ];
        for (name, help, n) in all {
            counter(
                &mut encoder.encode_descriptor(name, help, None, MetricType::Counter)?,
                n,
            )?;
        }
        Ok(())
    }
}

/// The data directory's saves and journal.
struct DataDirCollector {
    embedded: Embedded,
}

impl std::fmt::Debug for DataDirCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataDirCollector")
    }
}

impl Collector for DataDirCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(f) = self.embedded.figures() else {
            return Ok(());
        };
        {
            let help = "Saves of the embedded store to KOO_DATA_DIR since koo started, by result (ok, failed); a failed save is tried again at the next interval (per instance).";
            let mut family =
                encoder.encode_descriptor("koo_data_saves", help, None, MetricType::Counter)?;
            counter(&mut family.encode_family(&[("result", "ok")])?, f.saves)?;
            counter(
                &mut family.encode_family(&[("result", "failed")])?,
                f.failed_saves,
            )?;
        }
        ConstGauge::new(f.last_save_ms as f64 / 1000.0).encode(encoder.encode_descriptor(
            "koo_data_last_save_timestamp_seconds",
            "When the embedded store was last saved to KOO_DATA_DIR (Unix time; 0: not since koo started). Alert when it is older than a few snapshot intervals.",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(i64::try_from(f.journal_bytes).unwrap_or(i64::MAX)).encode(
            encoder.encode_descriptor(
                "koo_data_journal_bytes",
                "Bytes in the KOO_DATA_DIR journal's current file (acknowledged changes since the last save; a save starts a new file, and one past 64 MiB asks for a save).",
                None,
                MetricType::Gauge,
            )?,
        )?;
        counter(
            &mut encoder.encode_descriptor(
                "koo_data_journal_write_failures",
                "Batches of acknowledged changes the KOO_DATA_DIR journal could not write since koo started (their callers were told UNAVAILABLE).",
                None,
                MetricType::Counter,
            )?,
            f.journal_failures,
        )
    }
}

/// The live workers' figures.
fn encode_workers(encoder: &mut DescriptorEncoder, m: &TaskMetrics) -> Result<(), std::fmt::Error> {
    let gauge = |v: u64| ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
    let w = m.workers;
    let workers = [
        (
            "koo_workers",
            "Live workers: built-in pools, stream workers and recent unary callers.",
            w.live,
        ),
        (
            "koo_workers_external",
            "Live external workers (WorkerService).",
            w.external,
        ),
        (
            "koo_worker_slots",
            "Tasks the live workers may hold at once, in all.",
            w.slots,
        ),
        (
            "koo_worker_slots_busy",
            "Tasks the live workers hold now.",
            w.busy,
        ),
    ];
    for (name, help, n) in workers {
        let help = format!("{help} {SHARED}");
        gauge(n).encode(encoder.encode_descriptor(name, &help, None, MetricType::Gauge)?)?;
    }
    Ok(())
}
