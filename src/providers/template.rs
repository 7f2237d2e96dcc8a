//! `{key}` placeholders filled from a delivery's payload, for SMS/WhatsApp
//! bodies and e-mail subjects and bodies. A placeholder the payload lacks is an
//! error naming it: a message with a hole in it is worse than none.

use serde::Deserialize;
use serde_json::Value;

/// A provider-side template, as a channel's `templates` names it: Brevo's
/// are numbers, SendGrid's (`d-...`) and Mailgun's are strings. Which
/// provider takes which is [`crate::providers::ProviderKind::takes_template`].
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum TemplateId {
    Number(i64),
    Name(String),
}

impl std::fmt::Display for TemplateId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TemplateId::Number(n) => write!(f, "{n}"),
            TemplateId::Name(s) => f.write_str(s),
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TemplateError {
    #[error("placeholder {{{0}}} is not in the payload")]
    Missing(String),
    #[error("unclosed placeholder in template {0:?}")]
    Unclosed(String),
}

/// Renders `template`; `{{` and `}}` stand for literal braces.
pub fn render(template: &str, payload: &Value) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            out.push_str(&tail[..1]);
            rest = &tail[2..];
            continue;
        }
        if let Some(after) = tail.strip_prefix('}') {
            out.push('}');
            rest = after;
            continue;
        }
        let end = tail.find('}').ok_or_else(|| TemplateError::Unclosed(template.to_string()))?;
        let key = &tail[1..end];
        match payload.get(key) {
            Some(Value::String(s)) => out.push_str(s),
            Some(Value::Null) | None => return Err(TemplateError::Missing(key.to_string())),
            Some(other) => out.push_str(&other.to_string()),
        }
        rest = &tail[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A readable default text: the payload's `title`, else the event name.
pub fn default_text(event: &str, payload: &Value) -> String {
    match payload.get("title") {
        Some(Value::String(t)) if !t.is_empty() => t.clone(),
        _ => event.replace('_', " "),
    }
}

/// A push notification's title and body from the payload: the title as
/// [`default_text`]; the body the first non-empty string among `body`,
/// `message` and `text`, else the title again (a push without a body shows
/// nothing on some platforms).
pub fn push_text(event: &str, payload: &Value) -> (String, String) {
    let title = default_text(event, payload);
    let body = ["body", "message", "text"]
        .iter()
        .find_map(|k| payload.get(*k).and_then(Value::as_str).filter(|s| !s.trim().is_empty()))
        .map(str::to_string)
        .unwrap_or_else(|| title.clone());
    (title, body)
}

/// `+33612345678` → `+336*****678`, `jane@example.com` → `j***@example.com`:
/// enough to tell addresses apart in a log, not enough to contact anyone.
pub fn mask_address(s: &str) -> String {
    let s = s.strip_prefix("whatsapp:").unwrap_or(s);
    if let Some((user, domain)) = s.split_once('@') {
        let first: String = user.chars().take(1).collect();
        return format!("{first}***@{domain}");
    }
    let chars: Vec<char> = s.chars().collect();
    if chars.len() <= 6 {
        return "***".into();
    }
    let head: String = chars[..4].iter().collect();
    let tail: String = chars[chars.len() - 3..].iter().collect();
    format!("{head}{}{tail}", "*".repeat(chars.len() - 7))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn push_text_takes_title_and_body_from_the_payload() {
        let (t, b) = push_text("order_shipped", &json!({"title": "Shipped", "message": "Order 7 left", "body": ""}));
        assert_eq!((t.as_str(), b.as_str()), ("Shipped", "Order 7 left"));
        let (t, b) = push_text("order_shipped", &json!({"id": 7}));
        assert_eq!((t.as_str(), b.as_str()), ("order shipped", "order shipped"));
    }

    #[test]
    fn fills_placeholders_with_payload_values() {
        let p = json!({"title": "Stock bas 🦀", "n": 3, "ok": true});
        assert_eq!(render("{title} ({n}, {ok})", &p).unwrap(), "Stock bas 🦀 (3, true)");
        assert_eq!(render("{{literal}} {title}", &p).unwrap(), "{literal} Stock bas 🦀");
        assert_eq!(render("no placeholders\u{7}", &p).unwrap(), "no placeholders\u{7}");
    }

    #[test]
    fn a_missing_placeholder_is_named() {
        let err = render("Order {order} ready", &json!({"title": "x"})).unwrap_err();
        assert_eq!(err.to_string(), "placeholder {order} is not in the payload");
        assert!(matches!(render("{title", &json!({})), Err(TemplateError::Unclosed(_))));
    }

    #[test]
    fn addresses_are_masked() {
        assert_eq!(mask_address("+33612345678"), "+336*****678");
        assert_eq!(mask_address("whatsapp:+33612345678"), "+336*****678");
        assert_eq!(mask_address("jane@example.com"), "j***@example.com");
        assert_eq!(mask_address("123"), "***");
    }

    #[test]
    fn default_text_prefers_the_title() {
        assert_eq!(default_text("order_shipped", &json!({"title": "Parti !"})), "Parti !");
        assert_eq!(default_text("order_shipped", &json!({})), "order shipped");
    }
}
