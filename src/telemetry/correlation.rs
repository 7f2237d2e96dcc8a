//! Correlation values: what a route's `correlation_column` holds (a Django
//! request id, or a W3C `traceparent`), made safe to carry everywhere.
//!
//! The value comes from row data, so it is normalised once, at routing, into
//! something every destination accepts as is: a log field, an HTTP or e-mail
//! header value, a CloudEvents extension attribute, a ledger text column.
//! That is at most [`MAX_CHARS`] printable ASCII characters; anything else is
//! replaced by `_`. A value that parses as a W3C `traceparent` also names the
//! trace the delivery joins ([`TraceParent`]).

/// Longest correlation value kept (characters, all ASCII after [`normalise`]).
/// A `traceparent` is 55; request ids (UUIDs, ULIDs, `X-Request-ID`s) are under 64.
/// Migration 010 states the same cap on the ledger column.
pub const MAX_CHARS: usize = 128;

/// The value to store and carry, or `None` for an empty one (NULL and "" alike).
/// Surrounding whitespace is dropped, characters outside printable ASCII
/// (controls, CR/LF that could split a header, non-ASCII) become `_`, and the
/// result is cut to [`MAX_CHARS`].
pub fn normalise(raw: &str) -> Option<String> {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return None;
    }
    Some(trimmed.chars().take(MAX_CHARS).map(|c| if (' '..='~').contains(&c) { c } else { '_' }).collect())
}

/// A parsed W3C Trace Context `traceparent` (version 00):
/// `00-<32 hex trace-id>-<16 hex parent-id>-<2 hex flags>`.
/// https://www.w3.org/TR/trace-context/#traceparent-header
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    /// The caller's span (the Django request): our spans' parent.
    pub parent_id: [u8; 8],
    pub flags: u8,
}

impl TraceParent {
    /// `None` unless `s` is a valid version-00 traceparent (lowercase hex,
    /// trace id and parent id not all zeros, as the spec requires). Later
    /// versions may append fields; their first four are read the same way.
    pub fn parse(s: &str) -> Option<TraceParent> {
        let mut parts = s.split('-');
        let version = parts.next()?;
        let (trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?);
        let lower_hex =
            |p: &str, len: usize| p.len() == len && p.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !lower_hex(version, 2)
            || version == "ff"
            || !lower_hex(trace, 32)
            || !lower_hex(parent, 16)
            || !lower_hex(flags, 2)
        {
            return None;
        }
        if version == "00" && parts.next().is_some() {
            return None;
        }
        let mut trace_id = [0u8; 16];
        let mut parent_id = [0u8; 8];
        hex::decode_to_slice(trace, &mut trace_id).ok()?;
        hex::decode_to_slice(parent, &mut parent_id).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceParent { trace_id, parent_id, flags })
    }

    /// The header value for a span of this trace, `span_id` as the new parent.
    pub fn child(&self, span_id: [u8; 8]) -> String {
        format!("00-{}-{}-{:02x}", hex::encode(self.trace_id), hex::encode(span_id), self.flags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_w3c_traceparent_parses_and_malformed_ones_do_not() {
        let tp = TraceParent::parse(EXAMPLE).unwrap();
        assert_eq!(hex::encode(tp.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex::encode(tp.parent_id), "00f067aa0ba902b7");
        assert_eq!(tp.flags, 1);
        assert_eq!(tp.child([1, 2, 3, 4, 5, 6, 7, 8]), "00-4bf92f3577b34da6a3ce929d0e0e4736-0102030405060708-01");
        for bad in [
            "",
            "req-7f3a",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", // uppercase
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01", // zero trace id
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", // zero parent
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", // forbidden version
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  // short trace id
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x", // v00 has 4 fields
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
        let future = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more";
        assert!(TraceParent::parse(future).is_some(), "a later version's extra fields are ignored");
    }

    #[test]
    fn values_are_trimmed_cleaned_and_capped() {
        assert_eq!(normalise("  "), None);
        assert_eq!(normalise(" req-42 ").as_deref(), Some("req-42"));
        assert_eq!(normalise("a\r\nX-Evil: 1").as_deref(), Some("a__X-Evil: 1"), "no header splitting");
        assert_eq!(normalise("réq").as_deref(), Some("r_q"));
        let long = "x".repeat(500);
        assert_eq!(normalise(&long).unwrap().len(), MAX_CHARS);
        assert_eq!(normalise(EXAMPLE).as_deref(), Some(EXAMPLE));
    }
}
