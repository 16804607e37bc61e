//! Broker URLs: parsing (IPv6 hosts included) and redaction, so that no
//! password reaches a log line or an error message.

use lapin::uri::AMQPUri;

/// Parses a broker URL. The error text never contains the password.
pub fn parse_uri(url: &str) -> Result<AMQPUri, String> {
    let mut uri = url.parse::<AMQPUri>().map_err(|e| {
        format!(
            "invalid broker URL {}: {}",
            redact(url),
            redact_text(&e, url)
        )
    })?;
    // lapin's parser takes the host from a domain name only: for an IPv6
    // address it would fall back to "localhost", and connect there.
    if let Ok(parsed) = url::Url::parse(url)
        && let Some(url::Host::Ipv6(addr)) = parsed.host()
    {
        uri.authority.host = addr.to_string();
    }
    Ok(uri)
}

/// The URL with its password replaced by `***`, for logs and messages.
pub fn redact(url: &str) -> String {
    let Some(at) = url.rfind('@') else {
        return url.to_owned();
    };
    // The user info starts after `amqp:` or `amqps:`, and the `//` a valid
    // URL has. It ends at the last `@`: a password typed without
    // percent-encoding may hold `/`, `?`, `#`, `:` or `@` (masking a vhost
    // with an `@` too is the safe side). Without a known scheme, all of it
    // is masked.
    let start = match url.find(':') {
        Some(i) if matches!(url[..i].to_ascii_lowercase().as_str(), "amqp" | "amqps") => {
            if url[i + 1..].starts_with("//") {
                i + 3
            } else {
                i + 1
            }
        }
        _ => return format!("***@{}", &url[at + 1..]),
    };
    if at < start {
        return url.to_owned();
    }
    let userinfo = &url[start..at];
    let masked = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => userinfo.to_owned(),
    };
    format!("{}{masked}@{}", &url[..start], &url[at + 1..])
}

/// Removes the password of `url` from an error text, in case it was quoted.
pub fn redact_text(text: &str, url: &str) -> String {
    // The URL itself may be quoted whole (an unparsable one is).
    let text = text.replace(url, &redact(url));
    match url.parse::<AMQPUri>() {
        Ok(uri) if !uri.authority.userinfo.password.is_empty() => {
            text.replace(&uri.authority.userinfo.password, "***")
        }
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redact("amqp://host/%2f"), "amqp://host/%2f");
        assert_eq!(redact("amqps://u@h"), "amqps://u@h");
        assert_eq!(redact("amqp://u:p@ss@h/v"), "amqp://u:***@h/v");
        assert_eq!(redact("amqp:u:cr3t@h/v"), "amqp:u:***@h/v");
        assert_eq!(redact("amqp:u:pa://cr3t@h"), "amqp:u:***@h");
        assert_eq!(
            redact("amqp://u:cr3t@h/?x=a://b"),
            "amqp://u:***@h/?x=a://b"
        );
        assert_eq!(redact("guest:cr3t@h:5672/%2f"), "***@h:5672/%2f");
        assert_eq!(redact("AMQPS://u:cr3t@h"), "AMQPS://u:***@h");
        for url in ["guest:cr3t@h:5672/%2f", "amqp:u:pa://cr3t@h"] {
            let err = parse_uri(url).err().unwrap_or_default();
            assert!(!err.contains("cr3t"), "{err}");
        }
        assert!(!parse_uri("amqp:u:cr3t@h/v").unwrap_err().contains("cr3t"));
        for password in ["se/cr3t", "se?cr3t", "se#cr3t", "s/e@c?r#t"] {
            let url = format!("amqp://guest:{password}@127.0.0.1:5672/%2f");
            assert_eq!(redact(&url), "amqp://guest:***@127.0.0.1:5672/%2f");
            let err = parse_uri(&url).err().unwrap_or_default();
            assert!(!err.contains("cr3t") && !err.contains("c?r"), "{err}");
        }
        assert!(
            !parse_uri("amqp://u:topsecret@h:notaport/")
                .unwrap_err()
                .contains("topsecret")
        );
    }

    #[test]
    fn hosts_of_every_kind_are_kept() {
        for (url, host, port) in [
            ("amqp://u:p@[fd00::10]:5673/%2f", "fd00::10", 5673),
            ("amqps://[::1]/%2f", "::1", 5671),
            ("amqp://10.0.0.7/%2f", "10.0.0.7", 5672),
            ("amqp://rabbit.example/%2f", "rabbit.example", 5672),
        ] {
            let uri = parse_uri(url).unwrap();
            assert_eq!(uri.authority.host, host, "{url}");
            assert_eq!(uri.authority.port, port, "{url}");
        }
    }
}
