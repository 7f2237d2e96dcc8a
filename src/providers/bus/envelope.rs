//! The CloudEvents 1.0 envelope every bus sink sends, and the per-message
//! destination, key and headers resolved from the channel's route.
//!
//! One function builds it for all sinks so that the same delivery looks the
//! same on every bus: `id` = the delivery key, `source` = database + table,
//! `type` = the event, `subject` = the recipient, `time` = the commit time,
//! `data` = the allow-listed payload, `partitionkey` = the message key
//! (the CloudEvents partitioning extension). Only the header prefix of binary
//! mode differs, as each protocol binding says.
//! Spec: https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/spec.md

use serde::Serialize;

use super::{fill, BusMessage, EnvelopeMode};
use crate::providers::{OutboundMessage, ProviderError};

pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";
pub const DATA_CONTENT_TYPE: &str = "application/json";

/// One message ready for a bus.
#[derive(Clone, Debug, PartialEq)]
pub struct Outgoing {
    /// The delivery key: CloudEvents `id`, and the broker's de-duplication id where it has one.
    pub id: String,
    pub destination: String,
    /// RabbitMQ's exchange; empty elsewhere.
    pub exchange: String,
    pub key: String,
    /// Route headers, then (binary mode) the `ce` attributes. Content type apart.
    pub headers: Vec<(String, String)>,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

#[derive(Serialize)]
struct Structured<'a> {
    specversion: &'static str,
    id: &'a str,
    source: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<&'a str>,
    time: String,
    datacontenttype: &'static str,
    #[serde(skip_serializing_if = "str::is_empty")]
    partitionkey: &'a str,
    /// Distributed Tracing extension, when the correlation is a traceparent.
    #[serde(skip_serializing_if = "Option::is_none")]
    traceparent: Option<&'a str>,
    /// Any other correlation value (a request id).
    #[serde(skip_serializing_if = "Option::is_none")]
    correlationid: Option<&'a str>,
    data: &'a serde_json::Value,
}

/// Builds `m`'s event. `ce_prefix`: the binding's header prefix (`ce_` for
/// Kafka, `cloudEvents:` for AMQP, `ce-` for NATS and Redis).
pub fn build(m: &OutboundMessage, ce_prefix: &str) -> Result<Outgoing, ProviderError> {
    let bus: &BusMessage = m.bus.as_ref().ok_or_else(|| ProviderError::Permanent {
        reason: "bus sink called for a channel without a [channels.<name>.bus] route".into(),
    })?;
    let route = &bus.route;
    let recipient = bus.recipient.as_deref().unwrap_or("");
    let over = route.events.get(&m.event);
    let pick = |base: &str, o: Option<&String>| fill(o.map(String::as_str).unwrap_or(base), &m.event, recipient);
    let destination = pick(&route.destination, over.and_then(|o| o.destination.as_ref()));
    let exchange = pick(&route.exchange, over.and_then(|o| o.exchange.as_ref()));
    let key = pick(&route.key, over.and_then(|o| o.key.as_ref()));
    let mut merged = route.headers.clone();
    if let Some(o) = over {
        merged.extend(o.headers.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    let mut headers: Vec<(String, String)> =
        merged.iter().map(|(k, v)| (k.clone(), fill(v, &m.event, recipient))).collect();
    // RFC 3339 with a `Z`, as CloudEvents `time` requires.
    let time = bus.time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let subject = bus.recipient.as_deref();
    // The correlation value as a CloudEvents extension attribute: a W3C
    // traceparent as the Distributed Tracing extension's `traceparent`
    // (https://github.com/cloudevents/spec/blob/main/cloudevents/extensions/distributed-tracing.md),
    // anything else as `correlationid` (an extension name: lowercase
    // letters and digits, https://github.com/cloudevents/spec/blob/main/cloudevents/spec.md#naming-conventions).
    let (traceparent, correlationid) = match m.correlation.as_deref() {
        Some(v) if crate::telemetry::correlation::TraceParent::parse(v).is_some() => (Some(v), None),
        other => (None, other),
    };
    let encode = |e: serde_json::Error| ProviderError::Permanent { reason: format!("cannot encode the event: {e}") };
    let (content_type, body) = match route.mode {
        EnvelopeMode::Structured => {
            let event = Structured {
                specversion: "1.0",
                id: &m.idempotency_key,
                source: &bus.source,
                kind: &m.event,
                subject,
                time,
                datacontenttype: DATA_CONTENT_TYPE,
                partitionkey: &key,
                traceparent,
                correlationid,
                data: &m.payload,
            };
            (STRUCTURED_CONTENT_TYPE, serde_json::to_vec(&event).map_err(encode)?)
        }
        EnvelopeMode::Binary => {
            let mut attrs = vec![
                ("specversion", "1.0".to_string()),
                ("id", m.idempotency_key.clone()),
                ("source", bus.source.clone()),
                ("type", m.event.clone()),
                ("time", time),
            ];
            attrs.extend(subject.map(|s| ("subject", s.to_string())));
            if !key.is_empty() {
                attrs.push(("partitionkey", key.clone()));
            }
            attrs.extend(traceparent.map(|v| ("traceparent", v.to_string())));
            attrs.extend(correlationid.map(|v| ("correlationid", v.to_string())));
            headers.extend(attrs.into_iter().map(|(k, v)| (format!("{ce_prefix}{k}"), v)));
            (DATA_CONTENT_TYPE, serde_json::to_vec(&m.payload).map_err(encode)?)
        }
    };
    Ok(Outgoing { id: m.idempotency_key.clone(), destination, exchange, key, headers, content_type, body })
}

/// The message's size as brokers count it, near enough: body plus headers.
pub fn size(o: &Outgoing) -> usize {
    o.body.len() + o.key.len() + o.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::{TimeZone, Utc};
    use serde_json::json;

    use super::*;
    use crate::providers::bus::{BusRoute, EventRoute};

    fn message(mode: EnvelopeMode) -> OutboundMessage {
        let mut events = std::collections::BTreeMap::new();
        events.insert(
            "order_shipped".to_string(),
            EventRoute {
                destination: Some("orders".into()),
                headers: [("x".into(), "2".into())].into(),
                ..Default::default()
            },
        );
        OutboundMessage {
            delivery_id: 1,
            idempotency_key: "k-1".into(),
            channel_name: "ignored".into(),
            event: "order_shipped".into(),
            payload: json!({"id": 7}),
            contact: None,
            bus: Some(BusMessage {
                route: Arc::new(BusRoute {
                    destination: "n.{event}.{recipient}".into(),
                    exchange: String::new(),
                    key: "{recipient}".into(),
                    headers: [("x".into(), "1".into()), ("team".into(), "t-{recipient}".into())].into(),
                    mode,
                    source: None,
                    events,
                    ordering: false,
                }),
                source: "/app/public.orders".into(),
                recipient: Some("42".into()),
                time: Utc.with_ymd_and_hms(2026, 11, 26, 23, 36, 0).unwrap(),
            }),
            correlation: None,
            devices: Vec::new(),
        }
    }

    #[test]
    fn structured_carries_every_attribute_in_the_body() {
        let o = build(&message(EnvelopeMode::Structured), "ce_").unwrap();
        assert_eq!(o.destination, "orders", "the event's override wins");
        assert_eq!(o.key, "42");
        assert_eq!(o.content_type, STRUCTURED_CONTENT_TYPE);
        assert_eq!(o.headers, vec![("team".to_string(), "t-42".to_string()), ("x".to_string(), "2".to_string())]);
        let v: serde_json::Value = serde_json::from_slice(&o.body).unwrap();
        assert_eq!(
            v,
            json!({"specversion": "1.0", "id": "k-1", "source": "/app/public.orders", "type": "order_shipped",
                   "subject": "42", "time": "2026-11-26T23:36:00.000000Z", "datacontenttype": "application/json",
                   "partitionkey": "42", "data": {"id": 7}})
        );
    }

    #[test]
    fn binary_puts_attributes_in_prefixed_headers() {
        let o = build(&message(EnvelopeMode::Binary), "ce_").unwrap();
        assert_eq!(o.content_type, DATA_CONTENT_TYPE);
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&o.body).unwrap(), json!({"id": 7}));
        let h: std::collections::BTreeMap<_, _> = o.headers.into_iter().collect();
        assert_eq!(h["ce_id"], "k-1");
        assert_eq!(h["ce_type"], "order_shipped");
        assert_eq!(h["ce_subject"], "42");
        assert_eq!(h["ce_specversion"], "1.0");
        assert_eq!(h["ce_time"], "2026-11-26T23:36:00.000000Z");
        assert!(!h.contains_key("ce_traceparent") && !h.contains_key("ce_correlationid"));
    }

    #[test]
    fn the_correlation_value_is_a_cloudevents_extension() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut m = message(EnvelopeMode::Binary);
        m.correlation = Some(tp.into());
        let h: std::collections::BTreeMap<_, _> = build(&m, "ce-").unwrap().headers.into_iter().collect();
        assert_eq!(h["ce-traceparent"], tp);
        assert!(!h.contains_key("ce-correlationid"));

        let mut m = message(EnvelopeMode::Structured);
        m.correlation = Some("req-7f3a".into());
        let v: serde_json::Value = serde_json::from_slice(&build(&m, "ce_").unwrap().body).unwrap();
        assert_eq!(v["correlationid"], "req-7f3a");
        assert!(v.get("traceparent").is_none());
    }
}
