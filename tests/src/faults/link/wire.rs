//! Just enough of the NATS client protocol to follow JetStream deliveries and acknowledgements
//! on a connection: the operations that carry a message (`MSG` and `HMSG` from the server,
//! `PUB` and `HPUB` from the client), read out of bytes cut anywhere. Every other operation
//! (`INFO`, `CONNECT`, `SUB`, `PING` …) is one line and is passed over.

/// A message one of the operations carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Carried {
    pub subject: String,
    pub reply: Option<String>,
    /// The body, without the header block.
    pub payload: Vec<u8>,
    /// Where its operation began in the bytes that completed it, if it began in them.
    pub start: Option<usize>,
}

/// Reads one direction of a connection.
#[derive(Debug, Default)]
pub struct Reader {
    /// Bytes of an operation not yet complete.
    buf: Vec<u8>,
    /// The operation whose body is still to come.
    body: Option<Body>,
}

#[derive(Debug)]
struct Body {
    subject: String,
    reply: Option<String>,
    /// Bytes of the header block, and of headers and body together (then `\r\n`).
    headers: usize,
    total: usize,
    /// Where the operation began in `buf`; `None` once `buf` no longer holds it.
    line_at: Option<usize>,
}

impl Reader {
    /// Reads `bytes`, the next of the connection's; returns the messages they complete.
    pub fn read(&mut self, bytes: &[u8]) -> Vec<Carried> {
        let earlier = self.buf.len();
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut at = 0;
        loop {
            if let Some(body) = &self.body {
                if self.buf.len() - at < body.total + 2 {
                    break;
                }
                let start = at + body.headers.min(body.total);
                out.push(Carried {
                    subject: body.subject.clone(),
                    reply: body.reply.clone(),
                    payload: self.buf[start..at + body.total].to_vec(),
                    start: body.line_at.and_then(|at| at.checked_sub(earlier)),
                });
                at += body.total + 2;
                self.body = None;
                continue;
            }
            let Some(end) = self.buf[at..].windows(2).position(|w| w == b"\r\n") else { break };
            self.body = message_line(&self.buf[at..at + end], at);
            at += end + 2;
        }
        self.buf.drain(..at);
        if let Some(body) = &mut self.body {
            body.line_at = None;
        }
        out
    }
}

/// The body an operation line announces, if it carries a message: `MSG <subject> <sid>
/// [reply] <size>`, `HMSG <subject> <sid> [reply] <header size> <total size>`, and `PUB`,
/// `HPUB` alike without the sid.
fn message_line(line: &[u8], line_at: usize) -> Option<Body> {
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split_ascii_whitespace();
    let op = words.next()?.to_ascii_uppercase();
    let args: Vec<&str> = words.collect();
    let (subject, rest) = match op.as_str() {
        "MSG" | "HMSG" => (*args.first()?, args.get(2..)?),
        "PUB" | "HPUB" => (*args.first()?, args.get(1..)?),
        _ => return None,
    };
    let sizes = if op.starts_with('H') { 2 } else { 1 };
    let (reply, numbers) = match rest.len().checked_sub(sizes)? {
        0 => (None, rest),
        1 => (Some(rest[0].to_owned()), &rest[1..]),
        _ => return None,
    };
    let numbers: Vec<usize> = numbers.iter().map(|n| n.parse().ok()).collect::<Option<_>>()?;
    let (headers, total) = match numbers.as_slice() {
        [total] => (0, *total),
        [headers, total] => (*headers, *total),
        _ => return None,
    };
    Some(Body { subject: subject.to_owned(), reply, headers, total, line_at: Some(line_at) })
}

/// `(stream sequence, deliveries so far)` of a JetStream delivery, from its reply subject:
/// `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>`,
/// or with a domain and an account hash after `$JS.ACK.` (the newer form).
pub fn delivery(reply: &str) -> Option<(u64, u64)> {
    let tokens: Vec<&str> = reply.strip_prefix("$JS.ACK.")?.split('.').collect();
    let at = match tokens.len() {
        7 => 0,
        n if n >= 9 => 2,
        _ => return None,
    };
    Some((tokens.get(at + 3)?.parse().ok()?, tokens.get(at + 2)?.parse().ok()?))
}

/// Whether a message the client sent to a delivery's reply subject ends that delivery: every
/// acknowledgement but "working on it" (`+WPI`) does (`+ACK`, an empty body, `+NXT`, `+TERM`,
/// and `-NAK`, which hands the message back).
pub fn ends_delivery(payload: &[u8]) -> bool {
    !payload.starts_with(b"+WPI")
}

#[cfg(test)]
mod tests {
    use super::*;

    const WIRE: &[u8] = b"INFO {\"server_id\":\"x\"}\r\nPING\r\n\
        HMSG _INBOX.a 1 $JS.ACK.orders_events.inventory.2.41.7.1700000000.3 12 17\r\nNATS/1.0\r\n\r\nhello\r\n\
        MSG _INBOX.b 2 5\r\nhi\r\n!\r\n\
        PUB $JS.ACK.orders_events.inventory.1.40.6.1700000000.3 4\r\n+ACK\r\n\
        HPUB events _INBOX.c 12 14\r\nNATS/1.0\r\n\r\nok\r\n";

    /// Where each message's operation begins in [`WIRE`].
    fn beginnings() -> Vec<usize> {
        ["\nHMSG", "\nMSG", "\nPUB", "\nHPUB"]
            .iter()
            .map(|op| WIRE.windows(op.len()).position(|w| w == op.as_bytes()).expect("in the wire") + 1)
            .collect()
    }

    #[test]
    fn messages_cut_anywhere_read_whole_and_other_operations_pass() {
        let beginnings = beginnings();
        for cut in 1..WIRE.len() {
            let mut reader = Reader::default();
            let first = reader.read(&WIRE[..cut]);
            let second = reader.read(&WIRE[cut..]);
            let got: Vec<&Carried> = first.iter().chain(&second).collect();
            assert_eq!(got.len(), 4, "cut at {cut}");
            assert_eq!(got[0].reply.as_deref(), Some("$JS.ACK.orders_events.inventory.2.41.7.1700000000.3"));
            assert_eq!(got[0].payload, b"hello");
            assert_eq!(
                (got[1].subject.as_str(), got[1].reply.as_ref(), got[1].payload.as_slice()),
                ("_INBOX.b", None, &b"hi\r\n!"[..])
            );
            assert_eq!(
                (got[2].subject.as_str(), got[2].payload.as_slice()),
                ("$JS.ACK.orders_events.inventory.1.40.6.1700000000.3", &b"+ACK"[..])
            );
            assert_eq!((got[3].reply.as_deref(), got[3].payload.as_slice()), (Some("_INBOX.c"), &b"ok"[..]));
            // Each says where it began in the bytes that completed it, if it began in them.
            for (i, message) in got.iter().enumerate() {
                let began = beginnings[i];
                let expected = match i < first.len() {
                    true => Some(began),
                    false => began.checked_sub(cut),
                };
                assert_eq!(message.start, expected, "message {i}, cut at {cut}");
            }
        }
    }

    #[test]
    fn a_delivery_s_reply_subject_names_its_sequence_and_deliveries() {
        assert_eq!(delivery("$JS.ACK.orders_events.inventory.2.41.7.1700000000.3"), Some((41, 2)));
        assert_eq!(delivery("$JS.ACK.hub.ACCHASH.orders_events.inventory-p1.1.9.9.1700000000.0.rand"), Some((9, 1)));
        assert_eq!(delivery("$JS.API.CONSUMER.MSG.NEXT.orders_events.inventory"), None);
        assert_eq!(delivery("_INBOX.x"), None);
        assert!(ends_delivery(b"+ACK") && ends_delivery(b"") && ends_delivery(b"-NAK") && !ends_delivery(b"+WPI"));
    }
}
