//! A bare AMQP 0-9-1 publisher for what client libraries refuse to send:
//! here, a `message_id` that is not UTF-8 (the protocol's short strings are
//! bytes; lapin's are Rust strings).

use std::io::{Read, Write};
use std::net::TcpStream;

fn short(b: &[u8]) -> Vec<u8> {
    let mut v = vec![b.len() as u8];
    v.extend_from_slice(b);
    v
}

fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![kind];
    f.extend_from_slice(&channel.to_be_bytes());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(payload);
    f.push(0xce);
    f
}

fn method(channel: u16, class: u16, id: u16, args: &[u8]) -> Vec<u8> {
    let mut p = class.to_be_bytes().to_vec();
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(args);
    frame(1, channel, &p)
}

/// Reads frames until the method `class`.`id`; its arguments.
fn wait(s: &mut TcpStream, class: u16, id: u16) -> Vec<u8> {
    loop {
        let mut head = [0u8; 7];
        s.read_exact(&mut head).expect("read a frame");
        let len = u32::from_be_bytes(head[3..7].try_into().unwrap()) as usize;
        let mut payload = vec![0u8; len + 1];
        s.read_exact(&mut payload).expect("read a frame");
        if head[0] == 1 {
            let c = u16::from_be_bytes([payload[0], payload[1]]);
            let m = u16::from_be_bytes([payload[2], payload[3]]);
            if (c, m) == (class, id) {
                return payload[4..len].to_vec();
            }
            assert!(
                !matches!((c, m), (10, 50) | (20, 40)),
                "the broker closed: {:?}",
                String::from_utf8_lossy(&payload)
            );
        }
    }
}

/// Publishes `body` to `queue` through the default exchange of the test
/// broker (the host of `AMQP_URL`, as guest), with `message_id` set to raw
/// bytes, and waits for the publisher confirm.
pub fn publish_with_raw_message_id(queue: &str, message_id: &[u8], body: &[u8]) {
    let url = super::amqp_url();
    let host = url.rsplit('@').next().unwrap_or(&url);
    let host = host.split('/').next().unwrap_or(host);
    let addr = if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:5672")
    };
    let mut s = TcpStream::connect(&addr).expect("connect to the broker");
    s.write_all(b"AMQP\x00\x00\x09\x01").unwrap();
    wait(&mut s, 10, 10); // connection.start
    let mut start_ok = 0u32.to_be_bytes().to_vec(); // empty client properties
    start_ok.extend(short(b"PLAIN"));
    let auth = b"\x00guest\x00guest";
    start_ok.extend_from_slice(&(auth.len() as u32).to_be_bytes());
    start_ok.extend_from_slice(auth);
    start_ok.extend(short(b"en_US"));
    s.write_all(&method(0, 10, 11, &start_ok)).unwrap();
    let tune = wait(&mut s, 10, 30);
    let mut tune_ok = tune[..6].to_vec(); // channel-max, frame-max as offered
    tune_ok.extend_from_slice(&0u16.to_be_bytes()); // no heartbeat
    s.write_all(&method(0, 10, 31, &tune_ok)).unwrap();
    let mut open = short(b"/");
    open.extend(short(b""));
    open.push(0);
    s.write_all(&method(0, 10, 40, &open)).unwrap();
    wait(&mut s, 10, 41);
    s.write_all(&method(1, 20, 10, &short(b""))).unwrap();
    wait(&mut s, 20, 11);
    s.write_all(&method(1, 85, 10, &[0])).unwrap(); // confirm.select
    wait(&mut s, 85, 11);
    let mut publish = 0u16.to_be_bytes().to_vec();
    publish.extend(short(b""));
    publish.extend(short(queue.as_bytes()));
    publish.push(0);
    s.write_all(&method(1, 60, 40, &publish)).unwrap();
    // Content header: class, weight, body size, property flags (message-id
    // only: bit 7), then the message id.
    let mut header = 60u16.to_be_bytes().to_vec();
    header.extend_from_slice(&0u16.to_be_bytes());
    header.extend_from_slice(&(body.len() as u64).to_be_bytes());
    header.extend_from_slice(&(1u16 << 7).to_be_bytes());
    header.extend(short(message_id));
    s.write_all(&frame(2, 1, &header)).unwrap();
    s.write_all(&frame(3, 1, body)).unwrap();
    wait(&mut s, 60, 80); // basic.ack
    let mut close = 200u16.to_be_bytes().to_vec();
    close.extend(short(b"bye"));
    close.extend_from_slice(&[0, 0, 0, 0]);
    s.write_all(&method(0, 10, 50, &close)).unwrap();
    wait(&mut s, 10, 51);
}
