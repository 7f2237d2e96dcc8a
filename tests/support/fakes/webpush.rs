//! The Web Push fake: the demo's own push service (src/demo/push_service.rs),
//! reused rather than copied. It checks what a push service checks (RFC 8030
//! headers, the VAPID token's ES256 signature, audience and expiry, the 4096
//! byte limit), decrypts every push with the subscriber's private key, and
//! answers 201, 404/410 (gone), 413, or the statuses a test asks for.

// Test crates that push nothing include this module too.
#[allow(unused_imports)]
pub use outbox_relay::demo::push_service::PushService;
