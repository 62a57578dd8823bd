//! The idle streams of the streams benchmark: thousands of watchers that
//! should cost koo nothing, opened over a few HTTP/2 connections and then
//! polled, all of them, by one task through one `SelectAll` (which polls
//! only the streams that were woken), so that the client stays cheap on the
//! cores it shares with koo.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use koo::pb::cache::v1::WatchMetricsRequest;
use koo::pb::cache::v1::cache_service_client::CacheServiceClient;
use koo::pb::tasks::v1::task_service_client::TaskServiceClient;
use koo::pb::tasks::v1::{
    TaskCategory, WatchTaskMetricsRequest, WatchTaskRequest, WatchTasksRequest,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// A name no task has.
pub const ABSENT_NAME: &str = "koo.bench.nobody_runs_this";
/// Streams being opened at once.
const OPENING: usize = 64;
/// How long one stream may take to open. An HTTP/2 client waits for a free
/// stream slot without a word when a connection is at the server's limit.
const OPEN_TIMEOUT: Duration = Duration::from_secs(60);
/// A stream's item: (its index, -1 for a message, else the gRPC code it
/// ended with, 0 for a clean end).
type Item = (u32, i32);

/// How many streams of each kind.
#[derive(Clone, Copy)]
pub struct Counts {
    pub watch_task: usize,
    pub watch_tasks: usize,
    pub metrics: usize,
    pub task_metrics: usize,
}

impl Counts {
    pub fn total(&self) -> usize {
        self.watch_task + self.watch_tasks + self.metrics + self.task_metrics
    }

    /// The kind of stream `i`: the first `watch_task` are `WatchTask`, and
    /// so on in the order of the fields.
    fn kind(&self, i: usize) -> &'static str {
        let mut end = self.watch_task;
        for (count, kind) in [
            (self.watch_tasks, "WatchTask"),
            (self.metrics, "WatchTasks"),
            (self.task_metrics, "WatchMetrics"),
        ] {
            if i < end {
                return kind;
            }
            end += count;
        }
        "WatchTaskMetrics"
    }
}

/// What the idle streams received while open.
pub struct Tally {
    /// How long they were polled.
    pub seconds: f64,
    /// The fewest messages one `WatchMetrics` received.
    pub metrics_min: Option<u32>,
    /// The fewest messages one `WatchTaskMetrics` received.
    pub task_metrics_min: Option<u32>,
    /// Messages on `WatchTask` and filtered `WatchTasks`, which should get
    /// none (their tasks do not change; nothing matches their filter).
    pub unexpected: u64,
    /// Streams that ended while they should have stayed open.
    pub ended: u64,
    /// How those ended: by kind, then by gRPC code (0 for a clean end).
    pub endings: BTreeMap<&'static str, BTreeMap<i32, u64>>,
}

/// The open idle streams, polled by one task until closed.
pub struct IdleStreams {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Tally>,
    channels: Vec<Channel>,
}

impl IdleStreams {
    /// Opens `counts` streams round-robin over `channels`: `WatchTask` on
    /// `parked`, `WatchTasks` filtered by a name no task has (even) or by
    /// category DATABASE (odd), `WatchMetrics` and `WatchTaskMetrics` every
    /// second; each one's first message read (the reply's headers for
    /// `WatchTasks`, which sends nothing until an event matches).
    pub async fn open(channels: Vec<Channel>, counts: Counts, parked: &[String]) -> Result<Self> {
        let total = counts.total();
        if parked.len() < counts.watch_task {
            anyhow::bail!(
                "{} parked tasks for {} WatchTask",
                parked.len(),
                counts.watch_task
            );
        }
        let streams: Vec<BoxStream<'static, Item>> = futures::stream::iter(0..total)
            .map(|i| {
                let channel = channels[i % channels.len()].clone();
                async move {
                    tokio::time::timeout(OPEN_TIMEOUT, open_one(channel, i, counts, parked))
                    .await
                    .with_context(|| {
                        format!(
                            "stream {i} did not open within {OPEN_TIMEOUT:?}: over koo's streams \
                             per connection (hyper's default is 200; koo's \
                             KOO_MAX_CONCURRENT_STREAMS)? raise BENCH_STREAM_CONNECTIONS"
                        )
                    })?
                }
            })
            .buffer_unordered(OPENING)
            .try_collect()
            .await?;
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(poll_all(streams, stopped, counts));
        Ok(Self {
            stop,
            task,
            channels,
        })
    }

    /// Closes every stream, then every connection; what they received.
    pub async fn close(self) -> Result<Tally> {
        let _ = self.stop.send(());
        let tally = self.task.await?;
        drop(self.channels);
        Ok(tally)
    }
}

/// Opens stream `i` (its kind given by where `i` falls in `counts`).
async fn open_one(
    channel: Channel,
    i: usize,
    counts: Counts,
    parked: &[String],
) -> Result<BoxStream<'static, Item>> {
    let tag = u32::try_from(i)?;
    let every_second = Some(prost_types::Duration {
        seconds: 1,
        nanos: 0,
    });
    let mut tasks = TaskServiceClient::new(channel.clone());
    let watch_tasks_end = counts.watch_task + counts.watch_tasks;
    let metrics_end = watch_tasks_end + counts.metrics;
    Ok(if i < counts.watch_task {
        let mut s = tasks
            .watch_task(WatchTaskRequest {
                task_id: parked[i].clone(),
            })
            .await
            .context("WatchTask")?
            .into_inner();
        s.message().await?.context("WatchTask sent nothing")?;
        tagged(s, tag)
    } else if i < watch_tasks_end {
        let request = if i.is_multiple_of(2) {
            WatchTasksRequest {
                name: ABSENT_NAME.into(),
                ..Default::default()
            }
        } else {
            WatchTasksRequest {
                categories: vec![TaskCategory::Database as i32],
                ..Default::default()
            }
        };
        let s = tasks.watch_tasks(request).await.context("WatchTasks")?;
        tagged(s.into_inner(), tag)
    } else if i < metrics_end {
        let request = WatchMetricsRequest {
            interval: every_second,
        };
        let mut s = CacheServiceClient::new(channel)
            .watch_metrics(request)
            .await
            .context("WatchMetrics")?
            .into_inner();
        s.message().await?.context("WatchMetrics sent nothing")?;
        tagged(s, tag)
    } else {
        let request = WatchTaskMetricsRequest {
            interval: every_second,
        };
        let mut s = tasks
            .watch_task_metrics(request)
            .await
            .context("WatchTaskMetrics")?
            .into_inner();
        s.message()
            .await?
            .context("WatchTaskMetrics sent nothing")?;
        tagged(s, tag)
    })
}

/// A stream's messages as items tagged with its index, then its end.
fn tagged<T: Send + 'static>(s: tonic::Streaming<T>, tag: u32) -> BoxStream<'static, Item> {
    s.map(move |r| (tag, r.map_or_else(|status| status.code() as i32, |_| -1)))
        .chain(futures::stream::once(async move { (tag, 0) }))
        .boxed()
}

/// Polls every stream until told to stop; one counter per stream.
async fn poll_all(
    streams: Vec<BoxStream<'static, Item>>,
    mut stopped: oneshot::Receiver<()>,
    kinds: Counts,
) -> Tally {
    let started = Instant::now();
    let n = streams.len();
    let mut all = futures::stream::select_all(streams);
    let mut counts = vec![0u32; n];
    let mut ended = vec![false; n];
    let mut endings = BTreeMap::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            item = all.next(), if !all.is_empty() => match item {
                Some((i, -1)) => counts[i as usize] += 1,
                // an error is followed by the end marker: count it once
                Some((i, code)) if !std::mem::replace(&mut ended[i as usize], true) => {
                    let by_code = endings.entry(kinds.kind(i as usize)).or_insert_with(BTreeMap::new);
                    *by_code.entry(code).or_insert(0) += 1;
                }
                Some(_) => {}
                None => {}
            },
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(all);
    let first_metrics = kinds.watch_task + kinds.watch_tasks;
    let first_task_metrics = first_metrics + kinds.metrics;
    Tally {
        seconds,
        metrics_min: counts[first_metrics..first_task_metrics]
            .iter()
            .copied()
            .min(),
        task_metrics_min: counts[first_task_metrics..].iter().copied().min(),
        unexpected: counts[..first_metrics].iter().map(|&c| u64::from(c)).sum(),
        ended: ended.iter().filter(|&&e| e).count() as u64,
        endings,
    }
}

/// Connects `n` separate HTTP/2 connections to `addr`.
pub async fn connections(addr: &str, n: usize) -> Result<Vec<Channel>> {
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n {
        channels.push(
            tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                .connect_timeout(Duration::from_secs(10))
                .connect()
                .await
                .with_context(|| format!("cannot connect to koo at {addr}"))?,
        );
    }
    Ok(channels)
}
