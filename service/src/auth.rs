//! Authenticated time: pre-shared keys and message authentication codes.
//!
//! With a key, every datagram ends with a trailer: the key's id (4 bytes,
//! little-endian) and a 16-byte tag, BLAKE3 in keyed mode over everything
//! before the tag, truncated to 128 bits. A reply's tag also covers the tag
//! of the request it answers (without sending it), so a reply is valid for
//! that one request only: it cannot be replayed to answer another.
//!
//! Key files hold one key per line, `<id> <secret>`: the id a number from 1
//! to 4294967295, the secret 64 hexadecimal digits (32 bytes). Blank lines
//! and lines starting with `#` are ignored. `cerv --generate-key ID` prints
//! a fresh line.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

/// Bytes of the tag each authenticated datagram carries.
pub const TAG_LEN: usize = 16;
/// Bytes the trailer (key id and tag) adds to a datagram.
pub const TRAILER_LEN: usize = 4 + TAG_LEN;
/// A message authentication code.
pub type Tag = [u8; TAG_LEN];

/// A pre-shared key.
#[derive(Clone, PartialEq, Eq)]
pub struct Key {
    id: u32,
    secret: [u8; 32],
}

impl fmt::Debug for Key {
    /// Never prints the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key {{ id: {}, secret: <hidden> }}", self.id)
    }
}

impl Key {
    /// A key from its id and secret.
    pub fn new(id: u32, secret: [u8; 32]) -> Self {
        Key { id, secret }
    }

    /// A fresh random key.
    pub fn generate(id: u32) -> Self {
        Key {
            id,
            secret: rand::random(),
        }
    }

    /// The key's id, sent in the clear with every datagram.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The key as a key-file line: `<id> <64 hex digits>`.
    pub fn to_line(&self) -> String {
        let hex: String = self.secret.iter().map(|b| format!("{b:02x}")).collect();
        format!("{} {hex}", self.id)
    }

    /// The tag of `parts`, concatenated.
    pub fn tag(&self, parts: &[&[u8]]) -> Tag {
        let mut hasher = blake3::Hasher::new_keyed(&self.secret);
        for part in parts {
            hasher.update(part);
        }
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&hasher.finalize().as_bytes()[..TAG_LEN]);
        tag
    }

    /// Whether `tag` is the tag of `parts` (in constant time).
    pub fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        constant_time_eq::constant_time_eq(&self.tag(parts), tag)
    }
}

/// The keys a server accepts, by id.
#[derive(Clone, Debug, Default)]
pub struct Keys {
    by_id: HashMap<u32, Key>,
    first: Option<u32>,
}

/// A key file that cannot be used; the message names the file and line.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file cannot be read.
    #[error("cannot read key file '{path}': {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A line is not `<id> <secret>`.
    #[error("key file '{path}', line {line}: {reason}")]
    Line {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// No key at all.
    #[error("key file '{path}' holds no key")]
    Empty {
        /// The file.
        path: String,
    },
}

impl Keys {
    /// Reads a key file.
    pub fn load(path: &Path) -> Result<Keys, KeyFileError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text, &shown)
    }

    /// Parses key-file text; `path` is only for messages.
    pub fn parse(text: &str, path: &str) -> Result<Keys, KeyFileError> {
        let mut keys = Keys::default();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |reason: &str| KeyFileError::Line {
                path: path.to_owned(),
                line: i + 1,
                reason: reason.to_owned(),
            };
            let mut fields = line.split_whitespace();
            let (Some(id), Some(secret), None) = (fields.next(), fields.next(), fields.next())
            else {
                return Err(bad("expected '<key id> <64 hex digits>'"));
            };
            let id: u32 = id
                .parse()
                .ok()
                .filter(|&id| id > 0)
                .ok_or_else(|| bad("key id must be a number from 1 to 4294967295"))?;
            let secret = parse_hex32(secret).ok_or_else(|| bad("secret must be 64 hex digits"))?;
            if keys.by_id.insert(id, Key::new(id, secret)).is_some() {
                return Err(bad(&format!("key id {id} appears twice")));
            }
            keys.first.get_or_insert(id);
        }
        if keys.by_id.is_empty() {
            return Err(KeyFileError::Empty {
                path: path.to_owned(),
            });
        }
        Ok(keys)
    }

    /// A set of one key.
    pub fn single(key: Key) -> Keys {
        let id = key.id;
        Keys {
            by_id: HashMap::from([(id, key)]),
            first: Some(id),
        }
    }

    /// The key with this id.
    pub fn get(&self, id: u32) -> Option<&Key> {
        self.by_id.get(&id)
    }

    /// The first key of the file (what a client uses).
    pub fn first(&self) -> Option<&Key> {
        self.first.and_then(|id| self.by_id.get(&id))
    }

    /// How many keys.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// True if there are none.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// A server's keys, re-readable while it serves (SIGHUP): each batch of
/// requests takes the set in force with [`current`](KeyRing::current); a
/// [`reload`](KeyRing::reload) that fails keeps it.
#[derive(Debug)]
pub struct KeyRing {
    path: Option<std::path::PathBuf>,
    current: std::sync::RwLock<std::sync::Arc<Keys>>,
}

impl KeyRing {
    /// Reads a key file, to be read again on [`reload`](Self::reload).
    pub fn load(path: &Path) -> Result<KeyRing, KeyFileError> {
        Ok(KeyRing {
            current: std::sync::RwLock::new(std::sync::Arc::new(Keys::load(path)?)),
            path: Some(path.to_owned()),
        })
    }

    /// The keys in force.
    pub fn current(&self) -> std::sync::Arc<Keys> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reads the file again; on any error the keys in force stay. Keys
    /// given in code, not from a file, stay as they are.
    pub fn reload(&self) -> Result<(), KeyFileError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let fresh = std::sync::Arc::new(Keys::load(path)?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    /// The file, if the keys came from one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
}

impl From<Keys> for KeyRing {
    fn from(keys: Keys) -> KeyRing {
        KeyRing {
            path: None,
            current: std::sync::RwLock::new(std::sync::Arc::new(keys)),
        }
    }
}

/// Whether other users can read the file: its secrets are the whole of the
/// authentication, so the programs warn when they can.
pub fn readable_by_others(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).is_ok_and(|meta| meta.permissions().mode() & 0o077 != 0)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        false
    }
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let bytes = s.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn key_files_parse() {
        let text = format!("# keys\n\n7 {SECRET}\n  9 {}  \n", SECRET.to_uppercase());
        let keys = Keys::parse(&text, "k").unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys.first().map(Key::id), Some(7));
        assert_eq!(keys.get(9).map(Key::id), Some(9));
        assert_eq!(keys.get(7), keys.get(7));
        assert_eq!(keys.get(7).unwrap().to_line(), format!("7 {SECRET}"));
    }

    #[test]
    fn bad_key_files_name_the_line() {
        let cases = [
            ("", "holds no key"),
            ("# only a comment", "holds no key"),
            ("7", "line 1: expected"),
            (&format!("0 {SECRET}"), "line 1: key id must be"),
            (&format!("x {SECRET}"), "key id must be"),
            ("7 abc", "line 1: secret must be 64 hex digits"),
            (&format!("7 {}zz", &SECRET[..62]), "secret must be"),
            (
                &format!("7 {SECRET}\n7 {SECRET}"),
                "line 2: key id 7 appears twice",
            ),
            (&format!("7 {SECRET} extra"), "expected"),
        ];
        for (text, needle) in cases {
            let err = Keys::parse(text, "keys.txt").unwrap_err().to_string();
            assert!(
                err.contains("keys.txt") && err.contains(needle),
                "{text:?}: {err}"
            );
        }
        let err = Keys::load(Path::new("/nonexistent/keys"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("cannot read key file '/nonexistent/keys'"),
            "{err}"
        );
    }

    #[test]
    fn tags_verify_and_bind() {
        let key = Key::generate(1);
        let other = Key::generate(1);
        let tag = key.tag(&[b"hello", b" world"]);
        assert!(key.verify(&[b"hello world"], &tag));
        assert!(!key.verify(&[b"hello world!"], &tag));
        assert!(!other.verify(&[b"hello world"], &tag));
        assert!(!key.verify(&[b"hello world"], &tag[..8]));
        assert!(format!("{key:?}").contains("<hidden>"));
        let line = key.to_line();
        assert_eq!(Keys::parse(&line, "k").unwrap().first(), Some(&key));
    }
}
