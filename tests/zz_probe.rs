mod common;
use std::time::Duration;
use koo::pb::tasks::v1::{self as pb, task_service_client::TaskServiceClient};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe() {
    let redis = common::TestRedis::start().await;
    let mut settings = common::test_settings(common::redis_settings(&redis.url()));
    settings.tasks.workers = 4;
    let server = common::TestServer::spawn(settings).await;
    let mut c = TaskServiceClient::new(server.channel.clone());
    let (mut q, mut r, mut n) = (0i64, 0i64, 0);
    for _ in 0..300 {
        let t = c.submit_task(pb::SubmitTaskRequest { name: "koo.diagnostics.noop".into(), category: pb::TaskCategory::Research as i32, ..Default::default() }).await.unwrap().into_inner().task.unwrap();
        loop {
            let g = c.get_task(pb::GetTaskRequest { task_id: t.id.clone() }).await.unwrap().into_inner().task.unwrap();
            if g.state == pb::TaskState::Succeeded as i32 {
                let ms = |ts: Option<prost_types::Timestamp>| { let ts = ts.unwrap(); ts.seconds * 1_000_000 + ts.nanos as i64 / 1000 };
                q += ms(g.start_time) - ms(g.create_time);
                r += ms(g.end_time) - ms(g.start_time);
                n += 1;
                break;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }
    eprintln!("avg queued->started {} us, started->ended {} us", q / n, r / n);
}
