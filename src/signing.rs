//! Signed control headers. amqp-exec trusts two headers it reads back from
//! messages it republished: the attempt number (`x-amqp-exec-attempt`) and
//! the original `user_id` (`x-amqp-exec-user-id`). A publisher could set
//! them too, to skip the retries or pose as another broker user, so every
//! republish carries `x-amqp-exec-signature`: an HMAC-SHA256 over the work
//! queue, the message's id and body, and those two headers, keyed by a
//! secret that all instances of a deployment share (`key_file`). Headers
//! whose signature does not verify are ignored.

use ring::{digest, hmac};
use std::fmt;

/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-amqp-exec-signature";
/// Fewest bytes of a key file (after trimming white space).
pub const MIN_KEY_BYTES: usize = 32;

/// The HMAC key.
#[derive(Clone)]
pub struct SigningKey {
    key: hmac::Key,
    /// Where it came from, for messages: a file, or made for this process.
    pub source: KeySource,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    File(std::path::PathBuf),
    /// Random, for this process only.
    Process,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({:?})", self.source)
    }
}

impl PartialEq for SigningKey {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl SigningKey {
    /// A key from the bytes of a key file.
    pub fn from_secret(secret: &[u8], path: &std::path::Path) -> Result<SigningKey, String> {
        let trimmed = secret.trim_ascii();
        if trimmed.len() < MIN_KEY_BYTES {
            return Err(format!(
                "{} holds {} bytes; a key needs at least {MIN_KEY_BYTES} (for instance \
                 `head -c 32 /dev/urandom | base64 > {}`)",
                path.display(),
                trimmed.len(),
                path.display()
            ));
        }
        Ok(SigningKey {
            key: hmac::Key::new(hmac::HMAC_SHA256, trimmed),
            source: KeySource::File(path.to_owned()),
        })
    }

    /// A random key for this process alone.
    pub fn random() -> SigningKey {
        let rng = ring::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .expect("the operating system's random number generator works");
        SigningKey {
            key,
            source: KeySource::Process,
        }
    }

    /// The signature of the control headers of a message of work queue
    /// `queue` with id `message_id` and `body`: base64.
    pub fn sign(&self, fields: &Signed<'_>) -> String {
        use base64::Engine;
        let tag = hmac::sign(&self.key, &fields.canonical());
        base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
    }

    /// Whether `signature` is that of `fields`.
    pub fn verify(&self, fields: &Signed<'_>, signature: &str) -> bool {
        use base64::Engine;
        let Ok(tag) = base64::engine::general_purpose::STANDARD.decode(signature.trim()) else {
            return false;
        };
        hmac::verify(&self.key, &fields.canonical(), &tag).is_ok()
    }
}

/// What a signature covers.
pub struct Signed<'a> {
    /// The work queue the message belongs to.
    pub queue: &'a str,
    pub message_id: &'a str,
    pub body: &'a [u8],
    /// `x-amqp-exec-attempt`, if present.
    pub attempt: Option<i64>,
    /// `x-amqp-exec-user-id`, if present.
    pub user_id: Option<&'a str>,
}

impl Signed<'_> {
    fn canonical(&self) -> Vec<u8> {
        let body = digest::digest(&digest::SHA256, self.body);
        let mut out = Vec::with_capacity(128 + self.queue.len() + self.message_id.len());
        out.extend_from_slice(b"amqp-exec/1\0");
        for part in [
            self.queue.as_bytes(),
            self.message_id.as_bytes(),
            body.as_ref(),
        ] {
            out.extend_from_slice(&(part.len() as u64).to_be_bytes());
            out.extend_from_slice(part);
        }
        let attempt = self.attempt.map(|a| a.to_string()).unwrap_or_default();
        for part in [attempt.as_bytes(), self.user_id.unwrap_or("").as_bytes()] {
            out.extend_from_slice(&(part.len() as u64).to_be_bytes());
            out.extend_from_slice(part);
        }
        out.push(u8::from(self.attempt.is_some()));
        out.push(u8::from(self.user_id.is_some()));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields<'a>(attempt: Option<i64>, user: Option<&'a str>) -> Signed<'a> {
        Signed {
            queue: "q",
            message_id: "m",
            body: b"body",
            attempt,
            user_id: user,
        }
    }

    #[test]
    fn signatures_verify_only_for_what_they_cover() {
        let key = SigningKey::from_secret(&[7u8; 40], std::path::Path::new("k")).unwrap();
        let sig = key.sign(&fields(Some(3), Some("app")));
        assert!(key.verify(&fields(Some(3), Some("app")), &sig));
        assert!(!key.verify(&fields(Some(4), Some("app")), &sig));
        assert!(!key.verify(&fields(Some(3), Some("admin")), &sig));
        assert!(!key.verify(&fields(Some(3), None), &sig));
        let other_body = Signed {
            body: b"other",
            ..fields(Some(3), Some("app"))
        };
        assert!(!key.verify(&other_body, &sig));
        let other_queue = Signed {
            queue: "r",
            ..fields(Some(3), Some("app"))
        };
        assert!(!key.verify(&other_queue, &sig));
        assert!(!key.verify(&fields(Some(3), Some("app")), "not base64!"));
        // Another key, the same fields.
        let other = SigningKey::from_secret(&[8u8; 40], std::path::Path::new("k")).unwrap();
        assert!(!other.verify(&fields(Some(3), Some("app")), &sig));
        assert!(!SigningKey::random().verify(&fields(Some(3), Some("app")), &sig));
    }

    #[test]
    fn short_keys_are_refused() {
        let e = SigningKey::from_secret(b"  short \n", std::path::Path::new("/k")).unwrap_err();
        assert!(e.contains("/k") && e.contains("32"), "{e}");
    }
}
