//! A request's head: the fields of its header block, checked as they come
//! from the HPACK decoder against HTTP/2's rules for a request (RFC 9113
//! sections 8.2 and 8.3), and kept in one buffer that is reused from one
//! request to the next.
//!
//! A head that breaks a rule is malformed: its stream is reset with
//! `PROTOCOL_ERROR` (RFC 9113 section 8.1.1), the connection goes on. The
//! [`Malformed`] error names the rule.

use std::fmt;
use std::ops::Range;

/// A rule of RFC 9113 that a request's header fields broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed request: {}", self.0)
    }
}

impl std::error::Error for Malformed {}

/// What a header block is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Block {
    /// A request's header section: pseudo-fields, then regular fields.
    Request,
    /// A request's trailer section: regular fields only.
    Trailers,
}

/// The request pseudo-fields, in the order [`RequestHead`] keeps them.
const PSEUDO: [&[u8]; 4] = [b":method", b":scheme", b":authority", b":path"];
const METHOD: usize = 0;
const SCHEME: usize = 1;
const AUTHORITY: usize = 2;
const PATH: usize = 3;

/// Fields that name a connection's properties, which HTTP/2 forbids
/// (RFC 9113 section 8.2.2); `te` is allowed only as `trailers`.
const CONNECTION_SPECIFIC: [&[u8]; 5] = [
    b"connection",
    b"proxy-connection",
    b"keep-alive",
    b"transfer-encoding",
    b"upgrade",
];

/// One request's header fields, in a buffer kept across requests.
#[derive(Debug, Default)]
pub struct RequestHead {
    /// Names and values, back to back.
    bytes: Vec<u8>,
    /// Each regular field: its name's and its value's range in `bytes`.
    fields: Vec<(Range<usize>, Range<usize>)>,
    /// The pseudo-fields' values, by [`PSEUDO`] position.
    pseudo: [Option<Range<usize>>; 4],
}

impl RequestHead {
    /// Starts reading a header block into this head, which forgets what it
    /// held unless `block` is [`Block::Trailers`], whose fields are added.
    pub fn reader(&mut self, block: Block) -> HeadReader<'_> {
        if block == Block::Request {
            self.bytes.clear();
            self.fields.clear();
            self.pseudo = Default::default();
        }
        HeadReader {
            head: self,
            block,
            regular: false,
            error: None,
        }
    }

    fn slice(&self, range: &Range<usize>) -> &[u8] {
        &self.bytes[range.clone()]
    }

    fn pseudo(&self, which: usize) -> Option<&[u8]> {
        self.pseudo[which].as_ref().map(|r| self.slice(r))
    }

    /// `:method`.
    pub fn method(&self) -> &[u8] {
        self.pseudo(METHOD).unwrap_or_default()
    }

    /// `:scheme`.
    pub fn scheme(&self) -> &[u8] {
        self.pseudo(SCHEME).unwrap_or_default()
    }

    /// `:authority`, if sent.
    pub fn authority(&self) -> Option<&[u8]> {
        self.pseudo(AUTHORITY)
    }

    /// `:path`.
    pub fn path(&self) -> &[u8] {
        self.pseudo(PATH).unwrap_or_default()
    }

    /// The first regular field named `name` (lowercase), if any.
    pub fn get(&self, name: &[u8]) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(n, _)| self.slice(n) == name)
            .map(|(_, v)| self.slice(v))
    }

    /// The regular fields, in the order they came.
    pub fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields
            .iter()
            .map(|(n, v)| (self.slice(n), self.slice(v)))
    }
}

/// Reads one header block's fields into a [`RequestHead`]; see
/// [`RequestHead::reader`].
#[derive(Debug)]
pub struct HeadReader<'h> {
    head: &'h mut RequestHead,
    block: Block,
    /// A regular field has been read: no pseudo-field may follow.
    regular: bool,
    /// The first rule broken.
    error: Option<Malformed>,
}

impl HeadReader<'_> {
    /// Reads one field, as the HPACK decoder hands it over. After the
    /// first broken rule the rest are passed over; [`HeadReader::finish`]
    /// answers it.
    pub fn field(&mut self, name: &[u8], value: &[u8]) {
        if self.error.is_none() {
            if let Err(e) = self.read(name, value) {
                self.error = Some(e);
            }
        }
    }

    fn read(&mut self, name: &[u8], value: &[u8]) -> Result<(), Malformed> {
        check_value(value)?;
        if let Some(pseudo) = name.strip_prefix(b":") {
            if self.block == Block::Trailers {
                return Err(Malformed("a pseudo-header field in trailers"));
            }
            if self.regular {
                return Err(Malformed("a pseudo-header field after a regular field"));
            }
            let which = PSEUDO
                .iter()
                .position(|p| &p[1..] == pseudo)
                .ok_or(Malformed("a pseudo-header field a request does not have"))?;
            if self.head.pseudo[which].is_some() {
                return Err(Malformed("a pseudo-header field twice"));
            }
            let range = self.keep(value);
            self.head.pseudo[which] = Some(range);
            return Ok(());
        }
        check_name(name)?;
        if CONNECTION_SPECIFIC.contains(&name) {
            return Err(Malformed("a connection-specific header field"));
        }
        if name == b"te" && value != b"trailers" {
            return Err(Malformed("te other than \"trailers\""));
        }
        self.regular = true;
        let name = self.keep(name);
        let value = self.keep(value);
        self.head.fields.push((name, value));
        Ok(())
    }

    fn keep(&mut self, bytes: &[u8]) -> Range<usize> {
        let start = self.head.bytes.len();
        self.head.bytes.extend_from_slice(bytes);
        start..self.head.bytes.len()
    }

    /// The block's verdict: the first rule broken, or for a request's
    /// header section a missing `:method`, `:scheme` or `:path`, or an
    /// empty `:path`.
    pub fn finish(self) -> Result<(), Malformed> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if self.block == Block::Trailers {
            return Ok(());
        }
        let head = &*self.head;
        if head.pseudo[METHOD].is_none() || head.pseudo[SCHEME].is_none() {
            return Err(Malformed("no :method or no :scheme"));
        }
        if head.path().is_empty() {
            return Err(Malformed("no :path, or an empty one"));
        }
        Ok(())
    }
}

/// RFC 9113 section 8.2.1: no characters 0x00-0x20, 0x41-0x5a (uppercase)
/// or 0x7f-0xff, and not empty.
fn check_name(name: &[u8]) -> Result<(), Malformed> {
    if name.is_empty() {
        return Err(Malformed("an empty field name"));
    }
    if name
        .iter()
        .any(|&b| b <= 0x20 || b.is_ascii_uppercase() || b >= 0x7f)
    {
        return Err(Malformed(
            "a field name with an uppercase, space, control or non-ASCII character",
        ));
    }
    Ok(())
}

/// RFC 9113 section 8.2.1: no NUL, CR or LF, and no space or tab at either
/// end.
fn check_value(value: &[u8]) -> Result<(), Malformed> {
    if value.iter().any(|&b| matches!(b, 0 | b'\r' | b'\n')) {
        return Err(Malformed("a field value with NUL, CR or LF"));
    }
    let edge = |b: Option<&u8>| matches!(b, Some(b' ' | b'\t'));
    if edge(value.first()) || edge(value.last()) {
        return Err(Malformed(
            "a field value that starts or ends with whitespace",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRPC: &[(&str, &str)] = &[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/freshd.v1.Coordinator/Check"),
        (":authority", "127.0.0.1:7700"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("grpc-timeout", "99m"),
        ("user-agent", "tonic/0.14"),
    ];

    fn read(
        head: &mut RequestHead,
        block: Block,
        fields: &[(&str, &str)],
    ) -> Result<(), Malformed> {
        let mut reader = head.reader(block);
        for (n, v) in fields {
            reader.field(n.as_bytes(), v.as_bytes());
        }
        reader.finish()
    }

    #[test]
    fn a_grpc_request_keeps_its_pseudo_and_regular_fields() {
        let mut head = RequestHead::default();
        assert_eq!(read(&mut head, Block::Request, GRPC), Ok(()));
        assert_eq!(head.method(), b"POST");
        assert_eq!(head.scheme(), b"http");
        assert_eq!(head.path(), b"/freshd.v1.Coordinator/Check");
        assert_eq!(head.authority(), Some(&b"127.0.0.1:7700"[..]));
        assert_eq!(head.get(b"grpc-timeout"), Some(&b"99m"[..]));
        assert_eq!(head.get(b"authorization"), None);
        let names: Vec<&[u8]> = head.fields().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [&b"content-type"[..], b"te", b"grpc-timeout", b"user-agent"]
        );

        // Trailers add to the head; the next request starts afresh.
        assert_eq!(read(&mut head, Block::Trailers, &[("x-done", "1")]), Ok(()));
        assert_eq!(head.get(b"x-done"), Some(&b"1"[..]));
        assert_eq!(head.path(), b"/freshd.v1.Coordinator/Check");
        let next = [(":method", "POST"), (":scheme", "https"), (":path", "/a")];
        assert_eq!(read(&mut head, Block::Request, &next), Ok(()));
        assert_eq!(
            (head.path(), head.authority(), head.fields().count()),
            (&b"/a"[..], None, 0)
        );
    }

    #[test]
    fn each_rule_broken_is_named() {
        let base = [(":method", "POST"), (":scheme", "http"), (":path", "/p")];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut fields = base.to_vec();
            fields.extend_from_slice(extra);
            fields
        };
        let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
            (
                vec![(":method", "POST"), (":path", "/p")],
                "no :method or no :scheme",
            ),
            (
                vec![(":method", "POST"), (":scheme", "http")],
                "no :path, or an empty one",
            ),
            (
                vec![(":method", "POST"), (":scheme", "http"), (":path", "")],
                "no :path, or an empty one",
            ),
            (with(&[(":path", "/q")]), "a pseudo-header field twice"),
            (
                with(&[(":status", "200")]),
                "a pseudo-header field a request does not have",
            ),
            (
                with(&[("a", "1"), (":authority", "x")]),
                "a pseudo-header field after a regular field",
            ),
            (
                with(&[("Content-Type", "application/grpc")]),
                "a field name with an uppercase, space, control or non-ASCII character",
            ),
            (
                with(&[("a b", "1")]),
                "a field name with an uppercase, space, control or non-ASCII character",
            ),
            (
                with(&[("\u{e9}", "1")]),
                "a field name with an uppercase, space, control or non-ASCII character",
            ),
            (with(&[("", "1")]), "an empty field name"),
            (with(&[("a", "x\ny")]), "a field value with NUL, CR or LF"),
            (with(&[("a", "x\0")]), "a field value with NUL, CR or LF"),
            (
                with(&[("a", " x")]),
                "a field value that starts or ends with whitespace",
            ),
            (
                with(&[("a", "x\t")]),
                "a field value that starts or ends with whitespace",
            ),
            (
                with(&[("connection", "close")]),
                "a connection-specific header field",
            ),
            (
                with(&[("transfer-encoding", "chunked")]),
                "a connection-specific header field",
            ),
            (with(&[("te", "gzip")]), "te other than \"trailers\""),
        ];
        let mut head = RequestHead::default();
        for (fields, rule) in &cases {
            assert_eq!(
                read(&mut head, Block::Request, fields),
                Err(Malformed(rule)),
                "{fields:?}"
            );
        }
        assert_eq!(
            read(&mut head, Block::Trailers, &[(":path", "/x")]),
            Err(Malformed("a pseudo-header field in trailers"))
        );
        assert_eq!(
            Malformed("te other than \"trailers\"").to_string(),
            "malformed request: te other than \"trailers\""
        );
    }

    #[test]
    fn a_head_read_from_an_hpack_block_reuses_its_buffer() {
        let mut block = Vec::new();
        for (n, v) in GRPC {
            super::super::hpack::encode_field(n.as_bytes(), v.as_bytes(), &mut block);
        }
        let mut decoder = super::super::hpack::Decoder::new(4096);
        let mut head = RequestHead::default();
        let mut capacity = 0;
        for round in 0..3 {
            let mut reader = head.reader(Block::Request);
            decoder
                .decode(&block, 16 * 1024, |n, v| reader.field(n, v))
                .expect("a valid block");
            assert_eq!(reader.finish(), Ok(()));
            assert_eq!(head.path(), b"/freshd.v1.Coordinator/Check");
            if round == 0 {
                capacity = head.bytes.capacity();
            }
            assert_eq!(
                head.bytes.capacity(),
                capacity,
                "no new buffer in round {round}"
            );
        }
    }
}
