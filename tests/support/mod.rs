//! Shared test support: wire-level fakes of the providers.
//!
//! Each test crate uses only part of this, hence the `dead_code` allowance.
#![allow(dead_code)]

pub mod fake_ably;
pub mod fake_brevo;
pub mod fake_http;
pub mod fake_pusher;
pub mod fake_twilio;
pub mod pg;
pub mod pki;
pub mod relay;
pub mod tls_proxy;
