//! Publishing with publisher confirms: one helper used by retries, dead
//! letters, replay and the `publish` CLI, which checks both the confirm and a
//! `basic.return` for unroutable messages.

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Confirmation};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// How long a republish or reply, once sent, may wait for its confirm before
/// the job gives up and leaves the message unacked: a lost confirm must not
/// hold a worker slot for ever. While the broker blocks the connection (a
/// resource alarm) nothing is sent at all, and the job keeps its slot until
/// the alarm ends or the shutdown grace runs out.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a publish did not end with the broker taking responsibility.
#[derive(Debug)]
pub enum PublishError {
    /// The broker nacked the message.
    Nacked,
    /// The message was unroutable (no queue bound) and came back.
    Returned(String),
    /// The channel or connection failed.
    Broker(lapin::Error),
    /// No confirm within [`CONFIRM_TIMEOUT`].
    TimedOut,
}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PublishError::Nacked => write!(f, "the broker nacked the message"),
            PublishError::Returned(why) => write!(f, "the message was returned unroutable ({why})"),
            PublishError::Broker(e) => write!(f, "{e}"),
            PublishError::TimedOut => write!(
                f,
                "no publisher confirm within {}s",
                CONFIRM_TIMEOUT.as_secs()
            ),
        }
    }
}

impl std::error::Error for PublishError {}

impl From<lapin::Error> for PublishError {
    fn from(e: lapin::Error) -> Self {
        PublishError::Broker(e)
    }
}

/// The channel a delivery came on, in confirm mode: its jobs settle on it,
/// publishing their retries, dead letters and replies and acking their
/// deliveries (a delivery can only be acked on its own channel). lapin numbers
/// a publish for its confirm and queues its frames under two separate locks,
/// so two publishes racing on one channel from two threads can reach the
/// broker in the other order, and each would get the other's confirm: an ack
/// for a dead letter the broker returned. Publishes on it are therefore
/// numbered and queued one at a time, under a lock held only while they are
/// (the first poll of lapin's publish, which does both before its first
/// wait); the writes to the socket and the confirms are awaited together.
#[derive(Clone)]
pub struct SettleChannel {
    channel: Channel,
    sending: Arc<std::sync::Mutex<()>>,
    frame_max: usize,
}

impl SettleChannel {
    /// `channel` must be in confirm mode; `conn` is its connection.
    pub fn new(channel: Channel, conn: &lapin::Connection) -> Self {
        let frame_max = match conn.configuration().frame_max() {
            0 => usize::MAX,
            n => n as usize,
        };
        SettleChannel {
            channel,
            sending: Arc::new(std::sync::Mutex::new(())),
            frame_max,
        }
    }

    /// The largest frame the connection takes; a message's properties, its
    /// headers included, must fit in one.
    pub fn frame_max(&self) -> usize {
        self.frame_max
    }

    /// Acks `delivery`, which came on this channel, by writing the ack
    /// straight to the channel. [`lapin::Acker::ack`] does the same
    /// through lapin's internal task, which costs a task and two more
    /// thread hand-offs on every job. Ok(false) when the delivery can no
    /// longer be acked (its channel closed). Unlike `Acker::ack`, this does
    /// not mark the delivery used (lapin keeps that to itself): the caller
    /// settles each delivery once, as `job::settle` does. A second settle
    /// of the tag would make the broker close the channel.
    pub async fn ack(&self, delivery: &lapin::message::Delivery) -> lapin::Result<bool> {
        if !delivery.acker.usable() {
            return Ok(false);
        }
        self.channel
            .basic_ack(
                delivery.delivery_tag,
                lapin::options::BasicAckOptions::default(),
            )
            .await
            .map(|()| true)
    }

    async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> Result<lapin::PublisherConfirm, PublishError> {
        let publish = send_with(
            &self.channel,
            exchange,
            routing_key,
            body,
            properties,
            mandatory,
        );
        let mut publish = std::pin::pin!(publish);
        // The first poll numbers the publish and queues its frames.
        let first = std::future::poll_fn(|cx| {
            let _one_at_a_time = self.sending.lock().unwrap_or_else(|e| e.into_inner());
            std::task::Poll::Ready(publish.as_mut().poll(cx))
        })
        .await;
        match first {
            std::task::Poll::Ready(sent) => sent,
            std::task::Poll::Pending => publish.await,
        }
    }
}

/// Sends a mandatory publish and returns the future of its confirmation.
/// `channel` must be in confirm mode.
pub async fn send(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<lapin::PublisherConfirm, PublishError> {
    send_with(channel, exchange, routing_key, body, properties, true).await
}

async fn send_with(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
    mandatory: bool,
) -> Result<lapin::PublisherConfirm, PublishError> {
    Ok(channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory,
                ..BasicPublishOptions::default()
            },
            body,
            properties,
        )
        .await?)
}

/// Publishes a reply and waits for its confirm. Replies to RabbitMQ's direct
/// reply-to pseudo-queue must not be `mandatory`: the broker returns them as
/// unroutable even when it delivers them.
pub async fn publish_reply(
    channel: &SettleChannel,
    reply_to: &str,
    body: &[u8],
    properties: BasicProperties,
    mandatory: bool,
) -> Result<(), PublishError> {
    let confirm = channel
        .send("", reply_to, body, properties, mandatory)
        .await?;
    confirmed(confirm).await
}

/// Checks a confirmation: acked and not returned.
pub fn check(confirmation: Confirmation) -> Result<(), PublishError> {
    match confirmation {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
            Err(PublishError::Returned(format!(
                "{} {}",
                returned.reply_code,
                returned.reply_text.as_str()
            )))
        }
        Confirmation::Nack(None) => Err(PublishError::Nacked),
    }
}

/// Publishes and waits until the broker has confirmed it.
pub async fn publish_confirmed(
    channel: &SettleChannel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), PublishError> {
    let confirm = channel
        .send(exchange, routing_key, body, properties, true)
        .await?;
    confirmed(confirm).await
}

async fn confirmed(confirm: lapin::PublisherConfirm) -> Result<(), PublishError> {
    match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
        Ok(c) => check(c?),
        Err(_) => Err(PublishError::TimedOut),
    }
}
