//! `PauseQueue`, `ResumeQueue` and `ListQueues`: a queue's state and
//! figures as protobuf.

use crate::domain::task::{Category, QueueName};
use crate::domain::times::QueueTimes;
use crate::domain::{Pause, QueueStats};
use crate::pb::tasks::v1 as pb;

use super::metrics::queue_metrics;
use super::model::{timestamp, to_pb_category};

/// `queue` with its figures (no times: GetTaskMetrics has them) and pause.
pub(super) fn pb_queue((queue, stats): (QueueName, QueueStats)) -> pb::Queue {
    let category = Category::ALL
        .into_iter()
        .find(|c| c.default_queue() == queue)
        .map_or(pb::TaskCategory::Unspecified, to_pb_category);
    let state = if stats.paused.is_some() {
        pb::QueueState::Paused
    } else {
        pb::QueueState::Running
    };
    pb::Queue {
        name: queue.to_string(),
        category: category as i32,
        state: state as i32,
        pause: stats.paused.as_ref().map(pb_pause),
        metrics: Some(queue_metrics(&queue, &stats, &QueueTimes::default())),
    }
}

fn pb_pause(p: &Pause) -> pb::QueuePause {
    pb::QueuePause {
        principal: p.by.clone(),
        reason: p.reason.clone(),
        pause_time: timestamp(Some(p.at_ms)),
    }
}
