//! A worker on a Work stream, driven by a test as a program in another
//! language would drive it: the hello, the welcome, then koo's messages
//! read with a deadline (a test never hangs on a message that does not
//! come).

use koo::pb::worker::v1::{
    self as wpb, work_request::Message as In, work_response::Message as Out,
    worker_service_client::WorkerServiceClient,
};
use tokio::sync::mpsc;
use tonic::transport::Channel;

use super::{EVENT_TIMEOUT, TestServer};

/// An open Work stream and koo's welcome.
pub struct StreamWorker {
    pub tx: mpsc::Sender<wpb::WorkRequest>,
    pub rx: tonic::Streaming<wpb::WorkResponse>,
    pub welcome: wpb::Welcome,
}

/// A hello serving `task_names` from `queues` (empty: every queue).
pub fn hello(name: &str, task_names: &[&str], queues: &[&str], concurrency: i32) -> wpb::Hello {
    wpb::Hello {
        name: name.into(),
        task_names: task_names.iter().map(|s| s.to_string()).collect(),
        queues: queues.iter().map(|s| s.to_string()).collect(),
        concurrency,
        accept_batches: false,
        ..Default::default()
    }
}

/// A worker message.
pub fn msg(m: In) -> wpb::WorkRequest {
    wpb::WorkRequest { message: Some(m) }
}

impl StreamWorker {
    /// Opens a stream with `hello` and reads the welcome.
    pub async fn open(server: &TestServer, hello: wpb::Hello) -> Self {
        Self::open_on(server.channel.clone(), hello).await
    }

    /// [`Self::open`] on a channel of its own.
    pub async fn open_on(channel: Channel, hello: wpb::Hello) -> Self {
        Self::try_open(channel, hello).await.unwrap()
    }

    /// Opens a stream with `hello`: the stream and its welcome, or the
    /// status koo refused the hello with.
    pub async fn try_open(channel: Channel, hello: wpb::Hello) -> Result<Self, tonic::Status> {
        let mut client = WorkerServiceClient::new(channel);
        let (tx, rx) = mpsc::channel(16);
        tx.send(msg(In::Hello(hello))).await.unwrap();
        let mut rx = client
            .work(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        let welcome = match rx.message().await?.and_then(|m| m.message) {
            Some(Out::Welcome(w)) => w,
            other => panic!("expected welcome, got {other:?}"),
        };
        Ok(Self { tx, rx, welcome })
    }

    /// The next message from koo, whole (a batch stays a batch).
    pub async fn next_message(&mut self) -> wpb::WorkResponse {
        match tokio::time::timeout(EVENT_TIMEOUT, self.rx.message()).await {
            Err(_) => panic!("no message from koo"),
            Ok(Ok(Some(m))) => m,
            Ok(other) => panic!("the stream ended: {other:?}"),
        }
    }

    /// The next message from koo.
    pub async fn next(&mut self) -> Out {
        self.next_message().await.message.expect("a message")
    }

    /// The next message, which must be a task.
    pub async fn task(&mut self) -> wpb::TaskAssignment {
        match self.next().await {
            Out::Task(t) => t,
            other => panic!("expected a task, got {other:?}"),
        }
    }

    /// The next message, which must be a reply.
    pub async fn reply(&mut self) -> wpb::Reply {
        match self.next().await {
            Out::Reply(r) => r,
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    /// Sends a message.
    pub async fn send(&self, m: In) {
        self.tx.send(msg(m)).await.unwrap();
    }

    /// How the stream ended: its status (messages before it are skipped).
    pub async fn ended(&mut self) -> tonic::Status {
        loop {
            match tokio::time::timeout(EVENT_TIMEOUT, self.rx.message()).await {
                Err(_) => panic!("the stream did not end"),
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) => panic!("the stream ended without a status"),
                Ok(Err(status)) => return status,
            }
        }
    }
}
