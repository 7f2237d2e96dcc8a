//! A minimal SMTP server that keeps what it receives: the demo's mailbox and
//! the tests' fake mail server. It speaks enough of RFC 5321 for a real client
//! (lettre) — EHLO/HELO, MAIL, RCPT, DATA with dot-unstuffing, RSET, NOOP,
//! QUIT, AUTH PLAIN (any password; the user is recorded, to show whether a
//! client sent credentials) — and can be told to refuse recipients (550) or
//! defer (451). No STARTTLS: that is what a stripping middlebox leaves.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// One message as the sink received it.
#[derive(Clone, Debug)]
pub struct ReceivedMail {
    pub from: String,
    pub to: Vec<String>,
    /// Headers and body, CRLF line ends, dot-unstuffed.
    pub data: String,
}

impl ReceivedMail {
    /// A header's value (first occurrence, unfolded).
    pub fn header(&self, name: &str) -> Option<String> {
        let head = self.data.split("\r\n\r\n").next()?;
        let mut value: Option<String> = None;
        for line in head.split("\r\n") {
            if let Some(v) = &mut value {
                if line.starts_with([' ', '\t']) {
                    v.push_str(line.trim_start());
                    continue;
                }
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case(name) {
                    value = Some(v.trim().to_string());
                }
            }
        }
        value
    }

    pub fn body(&self) -> &str {
        self.data.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("")
    }

    /// The subject as a reader sees it (RFC 2047 encoded words decoded).
    pub fn subject(&self) -> String {
        decode_words(&self.header("Subject").unwrap_or_default())
    }

    /// The body as a reader sees it: quoted-printable or base64 transfer encoding undone.
    pub fn text(&self) -> String {
        let encoding = self.header("Content-Transfer-Encoding").unwrap_or_default().to_ascii_lowercase();
        let bytes = match encoding.as_str() {
            "quoted-printable" => quoted_printable(self.body(), false),
            "base64" => {
                use base64::Engine;
                let compact: String = self.body().split_whitespace().collect();
                base64::engine::general_purpose::STANDARD.decode(compact).unwrap_or_default()
            }
            _ => self.body().as_bytes().to_vec(),
        };
        String::from_utf8_lossy(&bytes).replace("\r\n", "\n")
    }
}

/// `=XX` escapes and `=` soft line breaks; in a header's Q encoding `_` is a space.
fn quoted_printable(s: &str, q_word: bool) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'=' if b[i + 1..].starts_with(b"\r\n") => i += 3,
            b'=' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(v) => out.push(v),
                    Err(_) => out.extend_from_slice(&b[i..i + 3]),
                }
                i += 3;
            }
            b'_' if q_word => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// Decodes `=?charset?B|Q?text?=` words; whitespace between two words is dropped (RFC 2047 §6.2).
fn decode_words(v: &str) -> String {
    use base64::Engine;
    let mut out = Vec::new();
    let mut rest = v;
    let mut after_word = false;
    while let Some(start) = rest.find("=?") {
        let (plain, tail) = rest.split_at(start);
        let mut parts = tail[2..].splitn(3, '?');
        let word = match (parts.next(), parts.next(), parts.next()) {
            (Some(_charset), Some(enc), Some(more)) => more.find("?=").map(|end| (enc, &more[..end], &more[end + 2..])),
            _ => None,
        };
        let Some((enc, text, after)) = word else { break };
        if !(after_word && plain.trim().is_empty()) {
            out.extend_from_slice(plain.as_bytes());
        }
        match enc {
            "b" | "B" => out.extend(base64::engine::general_purpose::STANDARD.decode(text).unwrap_or_default()),
            _ => out.extend(quoted_printable(text, true)),
        }
        rest = after;
        after_word = true;
    }
    out.extend_from_slice(rest.as_bytes());
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Default)]
struct State {
    mails: Vec<ReceivedMail>,
    /// Recipients refused with 550 (mailbox unavailable), consumed one by one.
    reject_next: usize,
    /// Transactions answered 451 (try again later), consumed one by one.
    defer_next: usize,
    /// Users who authenticated, in order.
    auth_users: Vec<String>,
}

/// Stops serving when dropped.
pub struct SmtpSink {
    port: u16,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SmtpSink {
    /// Listens on 127.0.0.1 on a free port.
    pub async fn start() -> std::io::Result<SmtpSink> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    let _ = session(socket, state).await;
                });
            }
        });
        Ok(SmtpSink { port, state, task })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `smtp://127.0.0.1:PORT`, for `[providers.smtp] url`.
    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    pub fn mails(&self) -> Vec<ReceivedMail> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).mails.clone()
    }

    pub fn reject_next_recipients(&self, n: usize) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).reject_next += n;
    }

    /// Users who sent AUTH PLAIN, in order.
    pub fn auth_users(&self) -> Vec<String> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).auth_users.clone()
    }

    pub fn defer_next(&self, n: usize) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).defer_next += n;
    }
}

async fn session(socket: TcpStream, state: Arc<Mutex<State>>) -> std::io::Result<()> {
    let (read, mut write) = socket.into_split();
    let mut lines = BufReader::new(read);
    write.write_all(b"220 outbox-relay sink ESMTP ready\r\n").await?;
    let (mut from, mut to): (Option<String>, Vec<String>) = (None, Vec::new());
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let command = line.trim_end().to_string();
        let verb = command.split_whitespace().next().unwrap_or("").to_ascii_uppercase();
        let reply: String = match verb.as_str() {
            "EHLO" => "250-outbox-relay sink\r\n250-8BITMIME\r\n250-AUTH PLAIN\r\n250 SMTPUTF8".into(),
            "AUTH" => {
                // AUTH PLAIN <base64(authzid NUL user NUL password)> (RFC 4616).
                let initial = command.split_whitespace().nth(2).unwrap_or("");
                use base64::Engine as _;
                let decoded = base64::engine::general_purpose::STANDARD.decode(initial).unwrap_or_default();
                let user = decoded.split(|b| *b == 0).nth(1).map(|u| String::from_utf8_lossy(u).into_owned());
                match user {
                    Some(user) => {
                        state.lock().unwrap_or_else(|p| p.into_inner()).auth_users.push(user);
                        "235 2.7.0 authentication successful".into()
                    }
                    None => "501 5.5.4 malformed AUTH PLAIN".into(),
                }
            }
            "HELO" => "250 outbox-relay sink".into(),
            "MAIL" => {
                let defer = {
                    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                    let d = s.defer_next > 0;
                    s.defer_next = s.defer_next.saturating_sub(1);
                    d
                };
                if defer {
                    "451 4.3.0 try again later".into()
                } else {
                    from = Some(angle(&command));
                    to.clear();
                    "250 2.1.0 ok".into()
                }
            }
            "RCPT" if from.is_some() => {
                let reject = {
                    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                    let r = s.reject_next > 0;
                    s.reject_next = s.reject_next.saturating_sub(1);
                    r
                };
                if reject {
                    "550 5.1.1 mailbox unavailable".into()
                } else {
                    to.push(angle(&command));
                    "250 2.1.5 ok".into()
                }
            }
            "DATA" if from.is_some() && !to.is_empty() => {
                write.write_all(b"354 end data with <CR><LF>.<CR><LF>\r\n").await?;
                let mut data = String::new();
                loop {
                    line.clear();
                    if lines.read_line(&mut line).await? == 0 {
                        return Ok(());
                    }
                    let l = line.trim_end_matches(['\r', '\n']);
                    if l == "." {
                        break;
                    }
                    // Dot-stuffing (RFC 5321 §4.5.2): a leading "." was doubled by the client.
                    data.push_str(l.strip_prefix('.').unwrap_or(l));
                    data.push_str("\r\n");
                }
                let mail = ReceivedMail { from: from.take().unwrap_or_default(), to: std::mem::take(&mut to), data };
                state.lock().unwrap_or_else(|p| p.into_inner()).mails.push(mail);
                "250 2.0.0 queued".into()
            }
            "RCPT" | "DATA" => "503 5.5.1 bad sequence of commands".into(),
            "RSET" => {
                from = None;
                to.clear();
                "250 2.0.0 ok".into()
            }
            "NOOP" => "250 2.0.0 ok".into(),
            "QUIT" => {
                write.write_all(b"221 2.0.0 bye\r\n").await?;
                return Ok(());
            }
            _ => "502 5.5.2 command not implemented".into(),
        };
        write.write_all(reply.as_bytes()).await?;
        write.write_all(b"\r\n").await?;
    }
}

/// `MAIL FROM:<a@b> SIZE=10` → `a@b`.
fn angle(command: &str) -> String {
    match (command.find('<'), command.find('>')) {
        (Some(a), Some(b)) if b > a => command[a + 1..b].to_string(),
        _ => command.split(':').nth(1).unwrap_or("").trim().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mail(head: &str, body: &str) -> ReceivedMail {
        ReceivedMail { from: String::new(), to: vec![], data: format!("{head}\r\n\r\n{body}") }
    }

    #[test]
    fn subjects_and_bodies_read_as_written() {
        let m = mail(
            "Subject: Commande 1042 =?utf-8?b?ZXhww6lkacOpZQ==?=\r\n =?utf-8?q?_=F0=9F=93=A6?=\r\nContent-Transfer-Encoding: quoted-printable",
            "Nouvelle session ouverte =F0=9F=94=90, une ligne tr=\r\ns longue",
        );
        assert_eq!(m.subject(), "Commande 1042 expédiée 📦");
        assert_eq!(m.text(), "Nouvelle session ouverte 🔐, une ligne trs longue");
        let plain = mail("Subject: =?bad", "x=3");
        assert_eq!((plain.subject(), plain.text()), ("=?bad".to_string(), "x=3".to_string()));
        let b64 = mail("Content-Transfer-Encoding: base64", "w6lj\r\naMOp");
        assert_eq!(b64.text(), "éché");
    }
}
