//! `amqp-exec dead`: list, replay and purge a queue's dead letters.

use super::Failure;
use super::session::*;
use crate::config::{self, dead_queue_name};
use crate::settlement::{
    ATTEMPT_HEADER, ATTEMPTS_HEADER, DELIVERY_COUNT_HEADER, EXIT_HEADER, FAILED_AT_HEADER,
    QUEUE_HEADER, STDERR_HEADER, USER_ID_HEADER,
};
use crate::{broker, headers, publish, settlement};
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, ConfirmSelectOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

/// One dead letter, as `dead list` shows it.
#[derive(Debug, serde::Serialize)]
pub struct DeadEntry {
    pub message_id: String,
    pub attempts: Option<i64>,
    pub exit: String,
    pub failed_at: String,
    pub queue: String,
    pub stderr: String,
    pub body_bytes: usize,
}

fn dead_entry(d: &lapin::message::Delivery) -> DeadEntry {
    let h = d.properties.headers().as_ref();
    DeadEntry {
        message_id: d
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default(),
        attempts: headers::int(h, ATTEMPTS_HEADER),
        exit: headers::string(h, EXIT_HEADER).unwrap_or_default(),
        failed_at: headers::string(h, FAILED_AT_HEADER).unwrap_or_default(),
        queue: headers::string(h, QUEUE_HEADER).unwrap_or_default(),
        stderr: headers::string(h, STDERR_HEADER).unwrap_or_default(),
        body_bytes: d.data.len(),
    }
}

async fn dead_count(session: &Session, dead: &str) -> Result<u32, Failure> {
    session
        .lost
        .race(broker::queue_depth(&session.channel, dead))
        .await?
        .map_err(|e| Failure::new(1, format!("queue \"{dead}\" is not there: {e}")))
}

/// The dead-letter queue of `queue`, if its name fits in AMQP's limit.
pub(super) fn dead_queue_arg(queue: &str) -> Result<String, Failure> {
    let dead = dead_queue_name(queue);
    if dead.len() > SHORT_MAX {
        return Err(Failure::new(
            2,
            format!(
                "--queue: {} bytes, and its dead-letter queue \"….dead\" {}; AMQP allows at \
                 most {SHORT_MAX}",
                queue.len(),
                dead.len()
            ),
        ));
    }
    Ok(dead)
}

/// `dead list`: prints up to `limit` dead letters and leaves them in place.
pub async fn dead_list(
    broker: &config::BrokerConfig,
    queue: &str,
    limit: Option<u32>,
    json: bool,
) -> Result<(), Failure> {
    let dead = dead_queue_arg(queue)?;
    let session = open(broker, "dead list").await?;
    let result = dead_list_on(&session, &dead, limit, json).await;
    session.close().await;
    result
}

async fn dead_list_on(
    session: &Session,
    dead: &str,
    limit: Option<u32>,
    json: bool,
) -> Result<(), Failure> {
    let (channel, lost) = (&session.channel, &session.lost);
    let available = dead_count(session, dead).await?;
    let n = limit.map_or(available, |l| l.min(available));
    // Only the last delivery's acker is kept: one nack with `multiple` hands
    // them all back, and the bodies need not stay in memory.
    let mut shown = 0usize;
    let mut last = None;
    for _ in 0..n {
        match lost
            .race(channel.basic_get(dead.into(), BasicGetOptions { no_ack: false }))
            .await?
        {
            Ok(Some(m)) => {
                let e = dead_entry(&m.delivery);
                if json {
                    println!("{}", serde_json::to_string(&e).unwrap_or_default());
                } else {
                    println!(
                        "{}\tattempts={}\texit={}\tfailed_at={}\t{}",
                        if e.message_id.is_empty() {
                            "-"
                        } else {
                            &e.message_id
                        },
                        e.attempts.map_or("-".to_string(), |a| a.to_string()),
                        e.exit,
                        e.failed_at,
                        e.stderr
                            .lines()
                            .find(|l| !l.trim().is_empty())
                            .unwrap_or("")
                    );
                }
                shown += 1;
                last = Some(m.delivery.acker);
            }
            Ok(None) => break,
            Err(e) => return Err(Failure::new(1, format!("cannot read {dead}: {e}"))),
        }
    }
    // Put them back where they were.
    if let Some(last) = last {
        let _ = lost
            .race(last.nack(BasicNackOptions {
                multiple: true,
                requeue: true,
            }))
            .await;
    }
    if !json {
        eprintln!("{shown} of {available} dead letter(s) in \"{dead}\" shown");
    }
    Ok(())
}

/// `dead replay`: republishes dead letters to their queue with the attempt
/// count reset, each acked from the dead queue only after its confirm.
pub async fn dead_replay(
    broker: &config::BrokerConfig,
    queue: &str,
    limit: Option<u32>,
) -> Result<(), Failure> {
    let dead = dead_queue_arg(queue)?;
    let session = open(broker, "dead replay").await?;
    let result = dead_replay_on(&session, queue, &dead, limit).await;
    session.close().await;
    let replayed = result?;
    println!("replayed {replayed} message(s) from \"{dead}\" to \"{queue}\"");
    Ok(())
}

async fn dead_replay_on(
    session: &Session,
    queue: &str,
    dead: &str,
    limit: Option<u32>,
) -> Result<u32, Failure> {
    let (channel, lost) = (&session.channel, &session.lost);
    lost.race(channel.confirm_select(ConfirmSelectOptions::default()))
        .await?
        .map_err(|e| Failure::new(1, format!("cannot enable publisher confirms: {e}")))?;
    let publisher = publish::SettleChannel::new(channel.clone(), &session.conn);
    let available = dead_count(session, dead).await?;
    // Bounded by what is there now, so that messages failing again are not replayed in a loop.
    let n = limit.map_or(available, |l| l.min(available));
    let mut replayed = 0u32;
    for _ in 0..n {
        let m = match lost
            .race(channel.basic_get(dead.into(), BasicGetOptions { no_ack: false }))
            .await?
        {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => return Err(Failure::new(1, format!("cannot read {dead}: {e}"))),
        };
        let d = m.delivery;
        let kept: std::collections::BTreeMap<ShortString, AMQPValue> = d
            .properties
            .headers()
            .as_ref()
            .map(|t| {
                t.inner()
                    .iter()
                    // Our own headers but the original `user_id` and its
                    // signature (made for the work queue), and the
                    // count of a quorum dead queue's returns (`dead list`
                    // adds to it): the attempts start over.
                    .filter(|(k, _)| {
                        (!k.as_str().starts_with("x-amqp-exec-")
                            || k.as_str() == USER_ID_HEADER
                            || k.as_str() == crate::signing::SIGNATURE_HEADER)
                            && k.as_str() != ATTEMPT_HEADER
                            && k.as_str() != DELIVERY_COUNT_HEADER
                    })
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let mut kept = FieldTable::from(kept);
        if let Some(v) = d.properties.user_id() {
            kept.insert(
                USER_ID_HEADER.into(),
                AMQPValue::LongString(LongString::from(v.as_str())),
            );
        }
        let props = settlement::republished_properties(&d.properties).with_headers(kept);
        if let Err(e) = lost
            .race(publish::publish_confirmed(
                &publisher, "", queue, &d.data, props,
            ))
            .await?
        {
            let _ = lost
                .race(d.acker.nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                }))
                .await;
            return Err(Failure::new(
                1,
                format!("replay stopped after {replayed}: cannot publish to \"{queue}\": {e}"),
            ));
        }
        lost.race(d.acker.ack(BasicAckOptions::default()))
            .await?
            .map_err(|e| Failure::new(1, format!("replayed but could not ack from {dead}: {e}")))?;
        replayed += 1;
    }
    Ok(replayed)
}

/// `dead purge`: deletes every dead letter of `queue`.
pub async fn dead_purge(
    broker: &config::BrokerConfig,
    queue: &str,
    yes: bool,
) -> Result<(), Failure> {
    let dead = dead_queue_arg(queue)?;
    if !yes {
        // A usage error whatever the broker says; the count only informs.
        let available = match open(broker, "dead purge").await {
            Ok(session) => {
                let n = dead_count(&session, &dead).await.ok();
                session.close().await;
                n
            }
            Err(_) => None,
        };
        let what = match available {
            Some(n) => format!("{n} message(s)"),
            None => "the dead letters".to_owned(),
        };
        return Err(Failure::new(
            2,
            format!("refusing to delete {what} from \"{dead}\" without --yes"),
        ));
    }
    let session = open(broker, "dead purge").await?;
    let purged = session
        .lost
        .race(
            session
                .channel
                .queue_purge(dead.as_str().into(), QueuePurgeOptions::default()),
        )
        .await;
    session.close().await;
    let purged = purged?.map_err(|e| Failure::new(1, format!("cannot purge {dead}: {e}")))?;
    println!("purged {purged} message(s) from \"{dead}\"");
    Ok(())
}
