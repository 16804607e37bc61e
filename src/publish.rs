//! Publishing with publisher confirms: one helper used by retries, dead
//! letters, replay and the `publish` CLI, which checks both the confirm and a
//! `basic.return` for unroutable messages.

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Confirmation};
use std::fmt;
use std::time::Duration;

/// How long a republish or reply may wait for its confirm before the job
/// gives up and leaves the message unacked (a lost confirm must not hold a
/// worker slot for ever; a resource alarm that blocks publishing longer than
/// this only makes the message come back later).
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
/// reply-to pseudo-queue are not mandatory: the broker returns them as
/// unroutable even when it delivers them.
pub async fn publish_reply(
    channel: &Channel,
    reply_to: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), PublishError> {
    let mandatory = !reply_to.starts_with("amq.rabbitmq.reply-to");
    let confirm = send_with(channel, "", reply_to, body, properties, mandatory).await?;
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
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), PublishError> {
    let confirm = send(channel, exchange, routing_key, body, properties).await?;
    confirmed(confirm).await
}

async fn confirmed(confirm: lapin::PublisherConfirm) -> Result<(), PublishError> {
    match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
        Ok(c) => check(c?),
        Err(_) => Err(PublishError::TimedOut),
    }
}
