//! The broker connection of a CLI tool: its first channel, and the loss that
//! ends every wait on it.

use super::{EX_UNAVAILABLE, Failure};
use crate::broker;
use crate::config::{self};
use lapin::{Channel, Connection};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Ends the command's waits on the broker once the connection is lost.
/// lapin may leave a request unanswered when it drops the connection (for
/// example on a frame it cannot parse): every wait of the CLI tools races
/// against this, so that none of them waits for ever.
#[derive(Clone)]
pub(super) struct Lost {
    pub(super) token: CancellationToken,
    pub(super) why: Arc<Mutex<Option<String>>>,
}

impl Lost {
    /// Watches `conn`: its error event, or a state other than connected
    /// (checked every second, in case the event came before the watch).
    /// While the broker blocks the connection nothing gets through, and the
    /// command waits: it says why.
    pub(super) fn watch(conn: &Connection) -> Lost {
        let lost = Lost {
            token: CancellationToken::new(),
            why: Arc::new(Mutex::new(None)),
        };
        let mut events = conn.events_listener();
        let status = conn.status().clone();
        let watcher = lost.clone();
        tokio::spawn(async move {
            use futures_lite::StreamExt;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                let event = tokio::select! {
                    e = events.next() => e,
                    _ = tick.tick() => {
                        if status.errored() || status.closed() {
                            watcher.set("the connection was closed");
                            return;
                        }
                        continue;
                    }
                };
                match event {
                    Some(lapin::Event::ConnectionBlocked(reason)) => tracing::warn!(
                        "the broker blocks publishing ({reason}); waiting until it unblocks"
                    ),
                    Some(lapin::Event::ConnectionUnblocked) => {
                        tracing::info!("the broker unblocked publishing")
                    }
                    // Also sent when the broker closes one channel (a
                    // passive declare of a missing queue): only the
                    // connection's own error counts.
                    Some(lapin::Event::Error(e)) if status.errored() || status.closed() => {
                        watcher.set(&e.to_string());
                        return;
                    }
                    Some(_) => {}
                    None => {
                        watcher.set("the connection was closed");
                        return;
                    }
                }
            }
        });
        lost
    }

    pub(super) fn set(&self, why: &str) {
        self.why
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(|| why.to_owned());
        self.token.cancel();
    }

    pub(super) fn failure(&self) -> Failure {
        let why = self.why.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Failure::new(
            1,
            format!(
                "lost the connection to the broker: {}",
                why.as_deref().unwrap_or("the connection was closed")
            ),
        )
    }

    /// `fut`'s output, or a failure once the connection is lost.
    pub(super) async fn race<T>(
        &self,
        fut: impl std::future::Future<Output = T>,
    ) -> Result<T, Failure> {
        tokio::select! {
            biased;
            v = fut => Ok(v),
            _ = self.token.cancelled() => Err(self.failure()),
        }
    }
}

/// A connection of a CLI tool, its first channel, and its loss.
pub(super) struct Session {
    pub(super) conn: Connection,
    pub(super) channel: Channel,
    pub(super) lost: Lost,
}

impl Session {
    pub(super) async fn close(&self) {
        let _ = self.conn.close(200, "done".into()).await;
    }

    /// A new channel on the connection.
    pub(super) async fn channel(&self) -> Result<Channel, Failure> {
        self.lost.race(channel_on(&self.conn)).await?
    }
}

pub(super) async fn open(broker: &config::BrokerConfig, what: &str) -> Result<Session, Failure> {
    let (conn, _) = broker::connect_any(broker, 0, &format!("amqp-exec {what}"))
        .await
        .map_err(|e| Failure::new(EX_UNAVAILABLE, e))?;
    let lost = Lost::watch(&conn);
    let channel = lost.race(channel_on(&conn)).await??;
    Ok(Session {
        conn,
        channel,
        lost,
    })
}

pub(super) async fn channel_on(conn: &Connection) -> Result<Channel, Failure> {
    conn.create_channel()
        .await
        .map_err(|e| Failure::new(EX_UNAVAILABLE, format!("cannot open a channel: {e}")))
}

/// Longest AMQP short string: queue and exchange names, routing keys,
/// header names, and properties such as the message id.
pub(super) const SHORT_MAX: usize = 255;

/// A usage error unless `value` fits in an AMQP short string.
pub(super) fn short(flag: &str, value: &str) -> Result<(), Failure> {
    if value.len() <= SHORT_MAX {
        return Ok(());
    }
    Err(Failure::new(
        2,
        format!(
            "{flag}: {} bytes; AMQP allows at most {SHORT_MAX}",
            value.len()
        ),
    ))
}
