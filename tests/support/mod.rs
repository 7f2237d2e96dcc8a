//! Shared test support: wire-level fakes of the providers.
//!
//! Each test crate uses only part of this, hence the `dead_code` allowance.
#![allow(dead_code)]

pub mod fakes;
pub mod pg;
pub mod pki;
pub mod relay;
pub mod tls_proxy;
