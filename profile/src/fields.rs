//! Checks of the text fields clients send: UTF-8, length, allowed
//! characters. Each failure is a typed [`Error`]; nothing is stored.

use crate::{config::Limits, error::Error, Result};

/// A UTF-8 field of at most `max` bytes.
pub fn text(field: &'static str, bytes: &[u8], max: usize) -> Result<String> {
    if bytes.len() > max {
        return Err(Error::FieldTooLong {
            field,
            len: bytes.len(),
            max,
        });
    }
    let s = std::str::from_utf8(bytes).map_err(|_| Error::InvalidUtf8(field))?;
    if s.chars().any(char::is_control) {
        return Err(Error::InvalidField {
            field,
            reason: "control characters are not allowed".into(),
        });
    }
    Ok(s.to_owned())
}

/// A username: 1..=max bytes of `a-z 0-9 _ . -`, starting with a letter
/// (so a number is always a user id, never a username).
pub fn username(bytes: &[u8], limits: &Limits) -> Result<String> {
    let s = text("username", bytes, limits.username_bytes_max)?;
    let ok_first = s.chars().next().is_some_and(|c| c.is_ascii_lowercase());
    let ok_rest = s
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.-".contains(c));
    if !ok_first || !ok_rest {
        return Err(Error::InvalidField {
            field: "username",
            reason: "must start with a-z and contain only a-z, 0-9, '_', '.', '-'".into(),
        });
    }
    Ok(s)
}

/// A friend group name: non-empty text within the limit.
pub fn group_name(bytes: &[u8], limits: &Limits) -> Result<String> {
    let s = text("group name", bytes, limits.group_name_bytes_max)?;
    if s.trim().is_empty() {
        return Err(Error::InvalidField {
            field: "group name",
            reason: "must not be empty".into(),
        });
    }
    Ok(s)
}

/// A chat group's name: non-empty text within
/// `limits.chat_group_name_bytes_max`.
pub fn chat_group_name(bytes: &[u8], limits: &Limits) -> Result<String> {
    let s = text("group name", bytes, limits.chat_group_name_bytes_max)?;
    if s.trim().is_empty() {
        return Err(Error::InvalidField {
            field: "group name",
            reason: "must not be empty".into(),
        });
    }
    Ok(s)
}

/// A chat group's topic: text (possibly empty) within
/// `limits.group_topic_bytes_max`.
pub fn group_topic(bytes: &[u8], limits: &Limits) -> Result<String> {
    text("group topic", bytes, limits.group_topic_bytes_max)
}

/// A password: not empty, at most [`proto::profile::PASSWORD_BYTES_MAX`].
pub fn password(bytes: &[u8]) -> Result<()> {
    let max = proto::profile::PASSWORD_BYTES_MAX;
    if bytes.len() > max {
        return Err(Error::FieldTooLong {
            field: "password",
            len: bytes.len(),
            max,
        });
    }
    if bytes.is_empty() {
        return Err(Error::InvalidField {
            field: "password",
            reason: "must not be empty".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::profile::ErrorCode;

    #[test]
    fn usernames() {
        let l = Limits::default();
        assert_eq!(username(b"alice_1", &l).unwrap(), "alice_1");
        for (bad, code) in [
            (&b""[..], ErrorCode::InvalidField),
            (b"1abc", ErrorCode::InvalidField),
            (b"Alice", ErrorCode::InvalidField),
            (b"a b", ErrorCode::InvalidField),
            (b"\xff\xfe", ErrorCode::InvalidUtf8),
            (&[b'a'; 33], ErrorCode::FieldTooLong),
        ] {
            assert_eq!(username(bad, &l).unwrap_err().code(), code, "{bad:?}");
        }
    }

    #[test]
    fn text_fields() {
        assert_eq!(text("nickname", "Zoë".as_bytes(), 8).unwrap(), "Zoë");
        assert_eq!(
            text("nickname", "Zoë".as_bytes(), 3).unwrap_err().code(),
            ErrorCode::FieldTooLong
        );
        assert_eq!(
            text("nickname", b"a\nb", 8).unwrap_err().code(),
            ErrorCode::InvalidField
        );
        assert!(group_name(b"  ", &Limits::default()).is_err());
        assert!(password(b"").is_err());
        let l = Limits::default();
        assert_eq!(chat_group_name(b"team", &l).unwrap(), "team");
        for (bad, code) in [
            (&b" "[..], ErrorCode::InvalidField),
            (b"", ErrorCode::InvalidField),
            (b"a\tb", ErrorCode::InvalidField),
            (b"\xff", ErrorCode::InvalidUtf8),
            (&[b'a'; 65], ErrorCode::FieldTooLong),
        ] {
            assert_eq!(
                chat_group_name(bad, &l).unwrap_err().code(),
                code,
                "{bad:?}"
            );
        }
        assert_eq!(group_topic(b"", &l).unwrap(), "");
        assert_eq!(
            group_topic(&[b'a'; 513], &l).unwrap_err().code(),
            ErrorCode::FieldTooLong
        );
        assert!(password(&[1; 257]).is_err());
    }
}
