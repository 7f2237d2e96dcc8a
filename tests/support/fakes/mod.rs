//! Wire-level fakes of the providers, one file each: in-process servers that
//! check what the real service checks (auth, signatures, body shape, limits)
//! and answer as it does, errors included. `http` is their shared plumbing.

pub mod ably;
pub mod brevo;
pub mod fcm;
pub mod google_auth;
pub mod http;
pub mod mailgun;
pub mod onesignal;
pub mod otlp;
pub mod pubnub;
pub mod pubsub;
pub mod pusher;
pub mod sendgrid;
pub mod sentry;
pub mod sns;
pub mod twilio;
pub mod webhook;
pub mod webpush;
