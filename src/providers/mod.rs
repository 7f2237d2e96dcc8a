//! Providers: the services that carry a delivery to a person or a bus.
//!
//! Each provider is one folder, `<name>/`: `config.rs` holds its
//! `[providers.<name>]` section and its [`Profile`] (limits, batch size, what
//! it needs to reach someone), `mod.rs` its client. The table at the end of
//! this file lists them, one line each; from it come [`ProviderKind`] (the
//! name a channel's `provider` key takes), [`ProvidersConfig`] (the
//! `[providers]` section) and [`Provider`] (the built clients).
//!
//! A closed enum rather than trait objects: the set is known at compile time,
//! `match` shows every provider at each decision, and adding one is one
//! folder plus one line of the table. Providers never import the top-level
//! configuration: it is composed from their sections, not the other way round.

pub mod ably;
pub mod brevo;
pub mod bus;
pub mod devices;
pub mod fcm;
pub mod google_auth;
mod http;
pub mod log;
pub mod mailgun;
pub mod onesignal;
pub mod pubnub;
pub mod pusher;
pub mod sendgrid;
pub mod smtp;
pub mod sns;
pub mod template;
pub mod twilio;
pub mod webhook;
pub mod webpush;

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;

/// What a provider is asked to deliver: one event on one provider channel.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboundMessage {
    /// Ledger row id; for logs and correlation only.
    pub delivery_id: i64,
    /// Stable across retries and restarts; providers that deduplicate (Ably's
    /// message `id`) get it so that a re-send after a crash is dropped there.
    pub idempotency_key: String,
    /// The provider-side channel, template already filled in (`private-user-42`).
    pub channel_name: String,
    pub event: String,
    /// A JSON object: the allow-listed columns or the row's payload.
    pub payload: serde_json::Value,
    /// E-mail, SMS, WhatsApp: where and what, looked up and rendered at send time.
    pub contact: Option<Contact>,
    /// Event-bus channels: the route and what the CloudEvents envelope says of the change.
    pub bus: Option<bus::BusMessage>,
    /// The row's correlation value, for providers with a metadata field for it
    /// (docs/providers.md, "Correlation"): a request id as is, or a W3C
    /// `traceparent` — with tracing on, naming this attempt's span as parent.
    /// Printable ASCII, at most 128 characters (`telemetry::correlation`).
    pub correlation: Option<String>,
    /// Push channels ([`Reach::Devices`]): the recipient's devices not yet
    /// reached by this delivery, looked up at send time. Empty otherwise.
    pub devices: Vec<devices::Device>,
}

/// A message to a person's address, prepared by dispatch just before sending.
#[derive(Clone, PartialEq)]
pub struct Contact {
    /// E-mail address or E.164 number. Personal data: never logged in clear.
    pub address: String,
    pub subject: String,
    pub body: String,
    /// The provider's template for the event, if the channel maps one for the
    /// provider this message goes to (Brevo: a number; SendGrid: `d-...`;
    /// Mailgun: a name). The payload fills it.
    pub template: Option<template::TemplateId>,
    /// Twilio: over WhatsApp rather than SMS.
    pub whatsapp: bool,
}

impl std::fmt::Debug for Contact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Contact")
            .field("address", &template::mask_address(&self.address))
            .field("template", &self.template)
            .field("whatsapp", &self.whatsapp)
            .finish_non_exhaustive()
    }
}

/// The provider took the message.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Accepted {
    /// The provider's own id for it, when it returns one (recorded in the ledger).
    pub provider_message_id: Option<String>,
}

/// Why a provider did not take a message. Every variant says whether trying
/// again can help: the dispatcher decides retry-or-not from `is_retryable` alone.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ProviderError {
    /// Timeouts, connection resets, 5xx, 429: the same request may succeed later.
    #[error("{reason}")]
    Retryable {
        reason: String,
        /// The provider asked us to wait at least this long (Retry-After).
        retry_after: Option<Duration>,
    },
    /// The provider refused this message for good (4xx other than 429, a payload
    /// over its size limit): retrying sends the same refusal.
    #[error("{reason}")]
    Permanent { reason: String },
    /// The provider refused our credentials. Permanent for the message, and it
    /// needs a human: counted in its own metric for alerting.
    #[error("{reason}")]
    Unauthorized { reason: String },
}

impl ProviderError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, ProviderError::Retryable { .. })
    }

    /// The same error with `address` masked wherever the provider echoed it
    /// (Twilio's 21211 message quotes the number): the reason goes to the
    /// ledger and the logs, which must not hold contact details.
    pub fn without_address(self, address: &str) -> ProviderError {
        let bare = address.strip_prefix("whatsapp:").unwrap_or(address);
        if bare.is_empty() {
            return self;
        }
        self.map_reason(|r| r.replace(bare, &template::mask_address(bare)))
    }

    /// The same error, its reason rewritten by `f` (to hide what it quotes).
    pub fn map_reason(self, f: impl Fn(String) -> String) -> ProviderError {
        match self {
            ProviderError::Retryable { reason, retry_after } => {
                ProviderError::Retryable { reason: f(reason), retry_after }
            }
            ProviderError::Permanent { reason } => ProviderError::Permanent { reason: f(reason) },
            ProviderError::Unauthorized { reason } => ProviderError::Unauthorized { reason: f(reason) },
        }
    }
}

/// The HTTP client every provider shares, so connections (and TLS sessions)
/// to a provider stay open between batches instead of being set up per call.
/// Per-request timeouts come from each provider's config, not from here.
pub fn http_client() -> reqwest::Client {
    http_builder()
        .build()
        // Building only fails if the TLS backend cannot initialise; the
        // default client has the same backend, so this is a last resort that
        // keeps startup going rather than a silent downgrade.
        .unwrap_or_else(|_| reqwest::Client::new())
}

/// [`http_client`], also trusting the CAs of `tls.ca_file` (an inspecting
/// proxy's, say). A bundle that cannot be read or parsed stops the start.
pub fn http_client_with(tls: &TlsConfig) -> Result<reqwest::Client, ProviderError> {
    let mut builder = http_builder();
    if let Some(path) = &tls.ca_file {
        let bad = |e: String| ProviderError::Permanent { reason: format!("tls.ca_file {path}: {e}") };
        let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| bad(e.to_string()))?;
        if certs.is_empty() {
            return Err(bad("no PEM certificate in the file".into()));
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().map_err(|e| ProviderError::Permanent { reason: format!("HTTP client: {e}") })
}

fn http_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .user_agent(concat!("outbox-relay/", env!("CARGO_PKG_VERSION")))
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(64)
        .tcp_keepalive(Duration::from_secs(60))
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        // Never follow: a 302 would turn a POST into a GET that "succeeds" and
        // the message would be recorded sent. A redirect is the provider's
        // answer, classified like any other status.
        .redirect(reqwest::redirect::Policy::none())
}

/// TLS to providers (HTTP APIs and SMTP). PostgreSQL's TLS is set in
/// `source.database_url`, libpq style.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM bundle of extra CAs to trust (an inspecting proxy, an internal mail
    /// relay), in addition to the usual public roots.
    #[serde(default)]
    pub ca_file: Option<String>,
}

/// How hard the relay may push one provider (`[limits.<provider>]`).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    /// Calls in flight at once, across all workers.
    pub concurrency: usize,
    /// Messages per second; 0 = unlimited.
    #[serde(default)]
    pub per_second: f64,
}

/// What a channel must say for a provider to reach someone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// A provider-side channel named from the recipient (`private-user-42`).
    Channel,
    /// A person's address (e-mail, phone), looked up at send time by the
    /// channel's `address_query`.
    Address,
    /// A topic, queue or stream, set by the channel's `[channels.<name>.bus]`.
    Bus,
    /// Either, per channel (Amazon SNS: SMS to an address, or a topic when
    /// the channel has a `[channels.<name>.bus]` route).
    AddressOrBus,
    /// The recipient's devices (push subscriptions, FCM tokens), looked up at
    /// send time by the channel's `tokens_query`; one call per device, and a
    /// result per device (see [`devices`]).
    Devices,
}

/// What dispatch needs to know of a provider before calling it; each
/// provider's `config.rs` defines its own as `PROFILE`, with the sources of
/// its numbers (docs/providers.md collects them).
#[derive(Clone, Copy, Debug)]
pub struct Profile {
    /// Defaults when `[limits.<provider>]` is absent.
    pub limits: LimitConfig,
    /// Messages per `send_batch` call that dispatch aims for: what the
    /// provider takes in one call. Each call's outcome is recorded as soon as
    /// it returns, so this also bounds the re-sends a crash can cause per call.
    pub batch_size: usize,
    pub reach: Reach,
}

/// What the provider table needs of each provider's config section.
pub trait Section: Clone + std::fmt::Debug + DeserializeOwned {
    /// The section a channel gets when `[providers.<name>]` is absent, for
    /// providers with nothing to configure (`log`); `None` makes it required.
    fn implicit() -> Option<Self> {
        None
    }
    /// The longest one call may take: shutdown waits this long for calls in flight.
    fn timeout(&self) -> Duration;
}

/// Shared by every client built at startup.
#[derive(Clone, Debug)]
pub struct BuildContext {
    /// One HTTP client (one connection pool) for every HTTP provider.
    pub http: reqwest::Client,
    pub tls: TlsConfig,
}

/// Sends one message at a time per provider call, all of a batch at once:
/// for providers whose API takes one message per call.
async fn each<'a, F, Fut>(messages: &'a [OutboundMessage], send: F) -> Vec<Result<Accepted, ProviderError>>
where
    F: Fn(&'a OutboundMessage) -> Fut,
    Fut: std::future::Future<Output = Result<Accepted, ProviderError>> + 'a,
{
    futures_util::future::join_all(messages.iter().map(send)).await
}

/// Generates, from one line per provider, the kind enum, the `[providers]`
/// section and the client enum with their matches. Each line reads
/// `Variant "name" field: module::path => Client(Config);`; the module must
/// define `PROFILE`, `Client::build(&Config, &BuildContext)` and
/// `Client::send_batch(&self, &[OutboundMessage])`.
macro_rules! provider_table {
    ($($Variant:ident $name:literal $field:ident: $($module:ident)::+ => $Client:ident($Config:ident);)+) => {
        /// A provider, as channels name it (`provider = "pusher"`).
        #[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[serde(rename_all = "lowercase")]
        pub enum ProviderKind {
            $($Variant,)+
        }

        impl ProviderKind {
            pub const ALL: &'static [ProviderKind] = &[$(ProviderKind::$Variant,)+];

            /// Stable name for the config, the ledger, logs and metric labels.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(ProviderKind::$Variant => $name,)+
                }
            }

            pub fn profile(self) -> Profile {
                match self {
                    $(ProviderKind::$Variant => $($module)::+::PROFILE,)+
                }
            }
        }

        /// `[providers]`: one optional section per provider.
        #[derive(Clone, Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct ProvidersConfig {
            $(#[serde(default)] pub $field: Option<$($module)::+::$Config>,)+
        }

        impl ProvidersConfig {
            /// Whether a channel may use `kind`: its section is set, or it needs none.
            pub fn has(&self, kind: ProviderKind) -> bool {
                match kind {
                    $(ProviderKind::$Variant => {
                        self.$field.is_some() || <$($module)::+::$Config as Section>::implicit().is_some()
                    })+
                }
            }

            /// The longest per-call timeout among configured providers.
            pub fn longest_timeout(&self) -> Duration {
                [$(self.$field.as_ref().map(Section::timeout),)+].into_iter().flatten().max().unwrap_or_default()
            }
        }

        /// The provider clients, built once from config and shared by dispatch workers.
        #[derive(Clone, Debug)]
        pub enum Provider {
            $($Variant($($module)::+::$Client),)+
        }

        impl Provider {
            /// The client for `kind`, from its section (checked present by config validation).
            pub fn build(kind: ProviderKind, cfg: &ProvidersConfig, ctx: &BuildContext) -> Result<Provider, ProviderError> {
                let missing = |name: &str| ProviderError::Permanent { reason: format!("[providers.{name}] is missing") };
                Ok(match kind {
                    $(ProviderKind::$Variant => {
                        let section = cfg.$field.clone().or_else(<$($module)::+::$Config as Section>::implicit);
                        let section = section.ok_or_else(|| missing($name))?;
                        Provider::$Variant($($module)::+::$Client::build(&section, ctx)?)
                    })+
                })
            }

            pub fn kind(&self) -> ProviderKind {
                match self {
                    $(Provider::$Variant(_) => ProviderKind::$Variant,)+
                }
            }

            /// Delivers `messages`, as few calls as the provider allows.
            ///
            /// Contract: returns exactly one result per message, in the same
            /// order. May be called concurrently from several workers. Calling it
            /// twice with the same message may deliver it twice, except where the
            /// provider deduplicates on `idempotency_key` (docs/providers.md says
            /// which). `Ok` means the provider accepted the message: it is the
            /// point after which the ledger marks it sent.
            pub async fn send_batch(&self, messages: &[OutboundMessage]) -> Vec<Result<Accepted, ProviderError>> {
                match self {
                    $(Provider::$Variant(p) => p.send_batch(messages).await,)+
                }
            }
        }
    };
}

provider_table! {
    Pusher "pusher" pusher: pusher => Pusher(PusherConfig);
    Ably "ably" ably: ably => Ably(AblyConfig);
    Pubnub "pubnub" pubnub: pubnub => Pubnub(PubnubConfig);
    Webhook "webhook" webhook: webhook => Webhook(WebhookConfig);
    Brevo "brevo" brevo: brevo => Brevo(BrevoConfig);
    Smtp "smtp" smtp: smtp => Smtp(SmtpConfig);
    Twilio "twilio" twilio: twilio => Twilio(TwilioConfig);
    Sendgrid "sendgrid" sendgrid: sendgrid => Sendgrid(SendgridConfig);
    Mailgun "mailgun" mailgun: mailgun => Mailgun(MailgunConfig);
    Sns "sns" sns: sns => Sns(SnsConfig);
    Log "log" log: log => Log(LogConfig);
    Kafka "kafka" kafka: bus::kafka => Kafka(KafkaConfig);
    Rabbitmq "rabbitmq" rabbitmq: bus::rabbitmq => Rabbitmq(RabbitmqConfig);
    Redis "redis" redis: bus::redis => RedisStreams(RedisConfig);
    Nats "nats" nats: bus::nats => Nats(NatsConfig);
    Webpush "webpush" webpush: webpush => Webpush(WebpushConfig);
    Pubsub "pubsub" pubsub: bus::pubsub => PubSub(PubSubConfig);
    Onesignal "onesignal" onesignal: onesignal => OneSignal(OneSignalConfig);
    Fcm "fcm" fcm: fcm => Fcm(FcmConfig);
}

impl ProviderKind {
    /// How this provider reaches someone on a channel that has (`bus`) or has
    /// not a `[channels.<name>.bus]` route: never [`Reach::AddressOrBus`].
    pub fn reach_with(self, bus: bool) -> Reach {
        match self.profile().reach {
            Reach::AddressOrBus if bus => Reach::Bus,
            Reach::AddressOrBus => Reach::Address,
            reach => reach,
        }
    }

    /// Event-bus sinks: they always need the channel's `[channels.<name>.bus]` route.
    pub fn is_bus(self) -> bool {
        self.profile().reach == Reach::Bus
    }

    /// Whether `[channels.<name>.bus]` may be set for this provider.
    pub fn can_bus(self) -> bool {
        matches!(self.profile().reach, Reach::Bus | Reach::AddressOrBus)
    }

    /// Whether this provider sends `template` (a channel's `templates` value),
    /// or why not: each service names its templates its own way.
    pub fn takes_template(self, template: &template::TemplateId) -> Result<(), String> {
        use template::TemplateId::{Name, Number};
        match (self, template) {
            (ProviderKind::Brevo, Number(_)) => Ok(()),
            (ProviderKind::Brevo, Name(_)) => Err("Brevo template ids are numbers".into()),
            // Dynamic templates are the ones that take `dynamic_template_data`:
            // https://www.twilio.com/docs/sendgrid/ui/sending-email/how-to-send-an-email-with-dynamic-templates
            (ProviderKind::Sendgrid, Name(n)) if n.starts_with("d-") => Ok(()),
            (ProviderKind::Sendgrid, _) => Err("SendGrid dynamic template ids are strings starting with \"d-\"".into()),
            (ProviderKind::Mailgun, Name(n)) if !n.trim().is_empty() => Ok(()),
            (ProviderKind::Mailgun, _) => Err("Mailgun templates are named by a non-empty string".into()),
            (kind, _) => Err(format!("provider {:?} has no templates", kind.as_str())),
        }
    }

    /// Push to devices: they need the channel's `tokens_query`.
    pub fn needs_devices(self) -> bool {
        self.profile().reach == Reach::Devices
    }
}

impl Provider {
    /// Stable name for the ledger, logs and metric labels.
    pub fn name(&self) -> &'static str {
        self.kind().as_str()
    }

    pub fn batch_size(&self) -> usize {
        self.kind().profile().batch_size
    }

    /// Delivers `messages` to their devices: one vector per message, one
    /// result per device of `message.devices`, in order. Each
    /// [`Reach::Devices`] provider has its arm here (its client's
    /// `send_devices`); for any other provider each message counts as one
    /// device, its `send_batch` result as that device's.
    pub async fn send_devices(&self, messages: &[OutboundMessage]) -> Vec<Vec<devices::DeviceResult>> {
        match self {
            Provider::Webpush(p) => p.send_devices(messages).await,
            Provider::Fcm(p) => p.send_devices(messages).await,
            other => other
                .send_batch(messages)
                .await
                .into_iter()
                .map(|r| vec![r.map_err(devices::DeviceError::Provider)])
                .collect(),
        }
    }
}
