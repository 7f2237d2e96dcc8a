//! Push to devices: one message, fanned out to each of the recipient's devices.
//!
//! Providers with [`Reach::Devices`](super::Reach::Devices) (Web Push, FCM)
//! deliver one HTTP call per device: a Web Push subscription or an FCM
//! registration token. Dispatch looks the devices up at send time (the
//! channel's `tokens_query`, src/devices.rs) and puts them in
//! [`OutboundMessage::devices`]. The provider answers per device
//! ([`DeviceResult`]); dispatch keeps those per-device outcomes
//! (`device_sends`), so that a retry goes only to the devices that did not
//! take the message yet, and then folds them into the message's one result
//! ([`fold`]) for the ledger.
//!
//! A device's token is as identifying as an address: it never reaches a log
//! in clear. [`Device`]'s `Debug` shows a short hash, [`Device::hash`] is what
//! the ledger keeps.

use std::time::Duration;

use sha2::{Digest, Sha256};

use super::{Accepted, OutboundMessage, ProviderError};

/// Most devices one recipient may have. A `tokens_query` that forgot its
/// `WHERE` would return every subscription of every user, and send one
/// person's notification to all of them: past this, the delivery fails with
/// "fix the query" instead of going out.
pub const MAX_DEVICES: usize = 100;

/// One device of a recipient, as the channel's `tokens_query` returned it.
#[derive(Clone, PartialEq, Eq)]
pub struct Device {
    /// FCM registration token, or the Web Push subscription's endpoint URL.
    /// Personal data: never logged in clear.
    pub token: String,
    /// Web Push: the subscription's P-256 public key (`p256dh`, base64url),
    /// which the payload is encrypted to (RFC 8291). `None` for FCM.
    pub p256dh: Option<String>,
    /// Web Push: the subscription's 16-byte authentication secret (`auth`,
    /// base64url), mixed into the encryption keys (RFC 8291 §3.3).
    pub auth: Option<String>,
}

impl Device {
    /// A device with only a token (FCM).
    pub fn token(token: impl Into<String>) -> Device {
        Device { token: token.into(), p256dh: None, auth: None }
    }

    /// What the ledger keeps of the device (`device_sends.device_hash`): the
    /// first 16 bytes of SHA-256 of the token. Enough to tell one
    /// recipient's devices apart, and says nothing of the token.
    pub fn hash(&self) -> [u8; 16] {
        let digest = Sha256::digest(self.token.as_bytes());
        let mut out = [0u8; 16];
        out.copy_from_slice(&digest[..16]);
        out
    }

    /// For logs and error texts: `device 1a2b3c4d`.
    pub fn label(&self) -> String {
        format!("device {}", hex::encode(&self.hash()[..4]))
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("hash", &hex::encode(&self.hash()[..4]))
            .field("web_push_keys", &self.p256dh.is_some())
            .finish_non_exhaustive()
    }
}

/// Why a device did not take a message.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum DeviceError {
    /// The device or subscription no longer exists (Web Push 404/410, FCM
    /// `UNREGISTERED`): permanent for this device; dispatch runs the
    /// channel's `on_invalid_token` so the application forgets it.
    #[error("{reason}")]
    Gone { reason: String },
    /// Anything else, classified as for any message (retryable or not).
    #[error(transparent)]
    Provider(#[from] ProviderError),
}

/// One device's answer.
pub type DeviceResult = Result<Accepted, DeviceError>;

/// `result` with the device's token, wherever a provider echoed it, replaced
/// by its label: reasons go to the ledger and the logs.
pub fn without_token(result: DeviceResult, device: &Device) -> DeviceResult {
    if device.token.is_empty() {
        return result;
    }
    let hide = |r: String| r.replace(&device.token, &device.label());
    result.map_err(|e| match e {
        DeviceError::Gone { reason } => DeviceError::Gone { reason: hide(reason) },
        DeviceError::Provider(p) => DeviceError::Provider(p.map_reason(hide)),
    })
}

/// Sends every message to each of its devices, all at once; one vector per
/// message, one result per device, in the order of `message.devices`. For
/// providers whose API takes one device per call (Web Push, FCM HTTP v1).
pub async fn fan_out<'a, F, Fut>(messages: &'a [OutboundMessage], send: F) -> Vec<Vec<DeviceResult>>
where
    F: Fn(&'a OutboundMessage, &'a Device) -> Fut,
    Fut: std::future::Future<Output = DeviceResult> + 'a,
{
    let send = &send;
    futures_util::future::join_all(
        messages.iter().map(|m| futures_util::future::join_all(m.devices.iter().map(move |d| send(m, d)))),
    )
    .await
}

/// The message's one result from its devices' results, `earlier` being the
/// devices that took it on a previous attempt (and are not asked again).
///
/// - Any device to try again (5xx, 429, timeout): the message is retried —
///   only those devices will be, the others' outcomes are kept — and waits at
///   least the longest `Retry-After` asked.
/// - Otherwise, if at least one device has it (now or earlier): sent.
/// - Otherwise every device refused it for good: every one gone is a
///   permanent failure saying so; else the first refusal (credentials
///   refused stays `Unauthorized`, for its alert).
pub fn fold(earlier: usize, results: &[DeviceResult], devices: &[Device]) -> Result<Accepted, ProviderError> {
    let total = earlier + results.len();
    let mut retry: Option<(String, Option<Duration>)> = None;
    let mut accepted: Option<Accepted> = None;
    let mut refused: Option<ProviderError> = None;
    for (i, r) in results.iter().enumerate() {
        let who = devices.get(i).map(Device::label).unwrap_or_else(|| format!("device #{i}"));
        match r {
            Ok(a) => {
                accepted.get_or_insert_with(|| a.clone());
            }
            Err(DeviceError::Gone { .. }) => {}
            Err(DeviceError::Provider(ProviderError::Retryable { reason, retry_after })) => match &mut retry {
                None => retry = Some((format!("{who}: {reason}"), *retry_after)),
                Some((text, wait)) => {
                    text.push_str(&format!("; {who}: {reason}"));
                    *wait = (*wait).max(*retry_after);
                }
            },
            Err(DeviceError::Provider(e)) => {
                refused.get_or_insert_with(|| e.clone());
            }
        }
    }
    if let Some((reason, retry_after)) = retry {
        return Err(ProviderError::Retryable { reason, retry_after });
    }
    if let Some(a) = accepted {
        return Ok(a);
    }
    if earlier > 0 {
        return Ok(Accepted::default());
    }
    match refused {
        Some(e) => Err(e),
        None => Err(ProviderError::Permanent {
            reason: format!(
                "all {total} device(s) are gone (expired or unsubscribed); the channel's on_invalid_token ran for each"
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retry(s: &str, after: u64) -> DeviceResult {
        Err(DeviceError::Provider(ProviderError::Retryable {
            reason: s.into(),
            retry_after: Some(Duration::from_secs(after)),
        }))
    }
    fn gone() -> DeviceResult {
        Err(DeviceError::Gone { reason: "410".into() })
    }
    fn ok() -> DeviceResult {
        Ok(Accepted { provider_message_id: Some("m".into()) })
    }
    fn perm() -> DeviceResult {
        Err(DeviceError::Provider(ProviderError::Permanent { reason: "413 too large".into() }))
    }

    #[test]
    fn a_device_to_retry_retries_the_message_with_the_longest_wait() {
        let r = fold(0, &[ok(), retry("503", 2), retry("429", 30)], &[]).unwrap_err();
        assert!(r.is_retryable());
        assert!(matches!(r, ProviderError::Retryable { retry_after: Some(d), .. } if d == Duration::from_secs(30)));
    }

    #[test]
    fn one_device_reached_is_sent_even_if_others_are_gone() {
        assert_eq!(fold(0, &[gone(), ok()], &[]), Ok(Accepted { provider_message_id: Some("m".into()) }));
        assert_eq!(fold(1, &[gone()], &[]), Ok(Accepted::default()), "reached on an earlier attempt");
        assert!(fold(0, &[perm(), ok()], &[]).is_ok());
    }

    #[test]
    fn all_gone_is_a_permanent_failure_that_says_so() {
        let e = fold(0, &[gone(), gone()], &[]).unwrap_err();
        assert!(
            matches!(&e, ProviderError::Permanent { reason } if reason.contains("all 2 device(s) are gone")),
            "{e:?}"
        );
        let e = fold(0, &[gone(), perm()], &[]).unwrap_err();
        assert_eq!(e, ProviderError::Permanent { reason: "413 too large".into() });
    }

    #[test]
    fn tokens_never_show_in_debug_or_labels() {
        let d = Device {
            token: "https://push.example.net/wpush/v2/SECRET-ENDPOINT".into(),
            p256dh: Some("BKEY".into()),
            auth: Some("AUTH".into()),
        };
        let shown = format!("{d:?} {}", d.label());
        assert!(!shown.contains("SECRET") && !shown.contains("BKEY") && !shown.contains("AUTH"), "{shown}");
        assert_eq!(d.hash(), Device::token(d.token.clone()).hash(), "the hash is the token's alone");
    }

    #[test]
    fn reasons_name_devices_by_hash() {
        let devices = [Device::token("a"), Device::token("b")];
        let e = fold(0, &[retry("503", 1), retry("502", 1)], &devices).unwrap_err();
        let text = e.to_string();
        assert!(text.contains(&devices[0].label()) && text.contains(&devices[1].label()), "{text}");
    }
}
